"""``halluc-rl demo``: the whole pipeline on the embedded default, offline, on a laptop CPU.

The shipped tiny model, then masked-error SFT of a LoRA policy (it learns to backtrack), beside a plain-SFT
baseline trained on the same problems for the same steps, then evaluation of every stage with and without
backtracking. Writes ``runs/demo/results.{md,json}`` and PNG plots, and prints what backtracking bought.
Later stages (DPO, PPO) add their rows to the same report: ``STAGES`` is an open list.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from halluc_rl.agents.sft import SFTConfig
from halluc_rl.config import LoraArgs, ModelArgs, parse_config, save_config
from halluc_rl.data.tasks import ArithmeticTask
from halluc_rl.evaluation import evaluate_policy, print_table, write_report
from halluc_rl.modeling import load_policy


@dataclass
class DemoArgs:
    output_dir: str = field(default="runs/demo", metadata={"help": "Where policies, results and plots go."})
    num_train_problems: int = field(default=1500, metadata={"help": "Training problems (both SFT runs)."})
    num_eval_problems: int = field(default=200, metadata={"help": "Held-out test problems per evaluation."})
    num_samples: int = field(default=4, metadata={"help": "Samples per problem at temperature 1."})
    num_train_epochs: float = field(default=2, metadata={"help": "SFT epochs (the curriculum cap rises each epoch)."})
    batch_size: int = field(default=32, metadata={"help": "SFT batch size."})
    learning_rate: float = field(default=2e-3, metadata={"help": "SFT (LoRA) learning rate."})
    error_source: str = field(default="plausible", metadata={"help": "random, plausible or self."})
    error_rate: float = field(default=0.25, metadata={"help": "Share of training examples with errors."})
    curriculum_caps: list[int] = field(default_factory=lambda: [1, 2],
                                       metadata={"help": "Most errors per example, epoch by epoch."})
    use_lora: bool = field(default=True, metadata={"help": "LoRA policies (true) or full fine-tuning."})
    backtrack_head: str = field(default="factorized", metadata={
        "help": "How the backtracking policy reads its backtrack logit: factorized or softmax (halluc_rl.losses)."})
    seed: int = field(default=0, metadata={"help": "Seeds training, sampling and the task."})
    report_to: str = field(default="none", metadata={"help": "tensorboard, trackio, wandb or none."})


def sft_stage(args: DemoArgs, name: str, error_source: str, backtrack_head: str = "softmax") -> Callable[[], object]:
    """A stage that trains a LoRA policy from the tiny model with ``error_source`` and returns its directory."""

    def run():
        from halluc_rl.agents.sft import SFTScriptArgs, train

        out = Path(args.output_dir) / name
        caps = list(args.curriculum_caps)
        script = SFTScriptArgs(num_train_problems=args.num_train_problems, task_seed=args.seed,
                               error_source=error_source, error_rate=args.error_rate, curriculum_caps=caps,
                               curriculum_boundaries=list(range(1, len(caps))), backtrack_head=backtrack_head)
        config = SFTConfig(output_dir=str(out), num_train_epochs=args.num_train_epochs,
                           per_device_train_batch_size=args.batch_size, learning_rate=args.learning_rate,
                           lr_scheduler_type="cosine", warmup_steps=5, logging_steps=10, save_strategy="no",
                           report_to=[] if args.report_to == "none" else [args.report_to], use_cpu=True,
                           gradient_checkpointing=False, seed=args.seed, max_length=512)
        train(script, ModelArgs(), LoraArgs(use_lora=args.use_lora), config)
        return out

    return run


def main(argv: list[str] | None = None) -> int:
    (args,) = parse_config([DemoArgs], argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(out / "demo_config.yaml", args)
    torch.manual_seed(args.seed)
    problems = ArithmeticTask(seed=args.seed).problems("test", args.num_eval_problems)
    stages: list[tuple[str, Callable[[], object]]] = [  # STAGES: later issues append dpo, ppo
        ("base", lambda: "tiny"),
        ("plain_sft", sft_stage(args, "plain_sft", "none")),
        ("backtrack_sft", sft_stage(args, "backtrack_sft", args.error_source, args.backtrack_head)),
    ]
    results: dict[str, dict] = {}
    timings: dict[str, float] = {}
    for name, make in stages:
        start = time.time()
        print(f"\n=== {name} ===")
        policy = make()
        model, tokenizer, _ = load_policy(policy)
        results[name] = evaluate_policy(model, tokenizer, problems, num_samples=args.num_samples, seed=args.seed)
        timings[name] = time.time() - start
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in results[name].items()}))
    paths = write_report(results, out, title="halluc-rl demo: the embedded tiny model on held-out arithmetic")
    print_table(results, title="halluc-rl demo")
    bt, plain = results["backtrack_sft"], results["plain_sft"]

    def num(value) -> str:
        return "-" if value is None else f"{value:.3f}"

    lines = ["What backtracking bought (held-out problems):"]
    for mode in ("greedy", "sampled"):
        ours, base, off = bt[f"accuracy_{mode}"], plain[f"accuracy_{mode}"], bt[f"accuracy_{mode}_no_backtrack"]
        lines.append(f"  {mode:<7} accuracy {num(ours)} with backtracking vs {num(base)} for plain SFT "
                     f"({ours - base:+.3f}); the same policy with backtracking off: {num(off)} ({ours - off:+.3f})")
    lines += [
        f"  backtrack rate {num(bt['backtrack_rate'])}, precision {num(bt['backtrack_precision'])}, "
        f"false-backtrack rate {num(bt['false_backtrack_rate'])} (greedy)",
        "  minutes per stage: " + ", ".join(f"{k} {v / 60:.1f}" for k, v in timings.items()),
        f"  report: {', '.join(str(p) for p in paths.values())}",
    ]
    print("\n" + "\n".join(lines))
    (out / "timings.json").write_text(json.dumps(timings, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
