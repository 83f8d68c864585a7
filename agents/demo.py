"""``halluc-rl demo``: the whole pipeline on the embedded default, offline, on a laptop CPU.

The shipped tiny model, then two arms trained on the same problems with the same budget:

* **backtracking**: masked-error SFT (the policy learns the mechanics of ``<|BACKTRACK|>``), token-level DPO at its
  own errors, then PPO with the oracle's process rewards;
* **control**: plain SFT, then the same PPO with the backtrack action masked everywhere.

Gains from RL alone then show in both arms; only what backtracking bought separates them. Every stage is evaluated
on held-out problems, greedy and sampled at temperature 1, with backtracking on and off. Writes
``runs/demo/results.{json,md}``, ``results.png`` (accuracy by stage) and ``rl.png`` (backtrack use and precision
during RL). A rerun skips stages already finished with the same settings, and resumes interrupted ones.

``halluc-rl demo --ablate --seeds 3`` runs every variant row (``ABLATION``) over three seeds and writes
``ablation.{json,md}`` with the mean and standard deviation of each figure, and the command of each row.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from halluc_rl.atomic import atomic_write_json, atomic_write_text
from halluc_rl.checkpoints import finished_run
from halluc_rl.config import (
    LoraArgs,
    ModelArgs,
    UsageError,
    check_choice,
    check_positive,
    check_task,
    cli,
    parse_cli,
    save_config,
)
from halluc_rl.data.errors import PLAUSIBLE_KINDS
from halluc_rl.data.tasks import load_problems
from halluc_rl.evaluation import evaluate_policy, print_table, write_report
from halluc_rl.modeling import load_policy

STAGES: tuple[str, ...] = ("base", "plain_sft", "backtrack_sft", "dpo", "ppo", "control_ppo")
KEYS: tuple[str, ...] = ("accuracy_greedy", "accuracy_sampled", "accuracy_greedy_no_backtrack",
                         "accuracy_sampled_no_backtrack", "backtrack_rate", "backtrack_precision",
                         "false_backtrack_rate", "sampled_backtrack_rate", "sampled_backtrack_precision",
                         "sampled_false_backtrack_rate", "sampled_failed_backtracks")


@dataclass
class DemoArgs:
    """The pipeline's budget and settings (defaults: the documented demo, docs/efficacy.md)."""

    output_dir: str = field(default="runs/demo", metadata={"help": "Where policies, results and plots go."})
    seed: int = field(default=0, metadata={"help": "Seeds training, sampling and the task."})
    task: str = field(default="arithmetic", metadata={
        "help": "The offline task, with settings if wanted (arithmetic:max_value=50,max_steps=4)."})
    num_train_problems: int = field(default=1500, metadata={"help": "Training problems (every stage, both arms)."})
    num_eval_problems: int = field(default=200, metadata={"help": "Held-out test problems per evaluation."})
    num_samples: int = field(default=4, metadata={"help": "Samples per problem at temperature 1."})
    sft_epochs: float = field(default=2, metadata={"help": "SFT epochs (the curriculum cap rises each epoch)."})
    sft_learning_rate: float = field(default=2e-3, metadata={"help": "SFT (LoRA) learning rate."})
    error_rate: float = field(default=0.25, metadata={"help": "Share of SFT examples with plausible errors."})
    error_kinds: list[str] = field(default_factory=lambda: list(PLAUSIBLE_KINDS), metadata={
        "help": "The plausible errors typed in SFT (digit, operator, step, check; check needs arithmetic:check=1 "
                "or 2)."})
    backtrack_head: str = field(default="factorized", metadata={"help": "factorized or softmax."})
    dpo_steps: int = field(default=60, metadata={"help": "DPO optimiser steps (0: skip the stage)."})
    dpo_form: str = field(default="single", metadata={"help": "single or continuation pairs."})
    dpo_problems: int = field(default=256, metadata={"help": "Problems the policy answers for the DPO pairs."})
    dpo_learning_rate: float = field(default=1e-4, metadata={"help": "DPO learning rate."})
    dpo_beta: float = field(default=0.5, metadata={"help": "DPO beta."})
    counter_ratio: float = field(default=3.0, metadata={"help": "DPO counter-pairs per error pair."})
    ppo_updates: int = field(default=100, metadata={"help": "PPO updates, in each arm."})
    ppo_advantage: str = field(default="group", metadata={"help": "gae, mc or group."})
    ppo_process_reward: str = field(default="oracle", metadata={"help": "none, oracle, prm or implicit."})
    ppo_process_credit: str = field(default="immediate", metadata={"help": "return or immediate."})
    ppo_learning_rate: float = field(default=3e-4, metadata={"help": "PPO learning rate."})
    kl_coef: float = field(default=0.02, metadata={"help": "PPO KL penalty to the reference."})
    backtrack_cost: float = field(default=0.1, metadata={"help": "PPO reward charged per backtrack."})
    max_new_tokens: int = field(default=0, metadata={
        "help": "Longest answer, in actions, for DPO sampling, PPO rollouts and evaluation (0: 128, 96 and 128, "
                "sized for the default task; check lines double an answer)."})
    use_lora: bool = field(default=True, metadata={
        "help": "LoRA policies (true) or full fine-tuning in every stage (false; PPO then needs --kl_coef 0: its KL "
                "reference is the policy with its adapter disabled)."})
    ablate: bool = field(default=False, metadata={"help": "Run every ablation row over --seeds seeds."})
    seeds: int = field(default=3, metadata={"help": "--ablate: seeds per row."})


def sft_stage(args: DemoArgs, out: Path, error_source: str, head: str) -> Path:
    from halluc_rl.agents.sft import SFTConfig, SFTScriptArgs, train

    caps = [1, 2]
    script = SFTScriptArgs(task=args.task, num_train_problems=args.num_train_problems, task_seed=args.seed,
                           error_source=error_source, error_kinds=list(args.error_kinds),
                           error_rate=args.error_rate, curriculum_caps=caps, curriculum_boundaries=[1],
                           backtrack_head=head)
    config = SFTConfig(output_dir=str(out), num_train_epochs=args.sft_epochs, per_device_train_batch_size=32,
                       learning_rate=args.sft_learning_rate, lr_scheduler_type="cosine", warmup_steps=5,
                       logging_steps=10, save_strategy="no", report_to=[], use_cpu=True,
                       gradient_checkpointing=False, seed=args.seed, max_length=512, disable_tqdm=False)
    lora = LoraArgs(use_lora=args.use_lora)
    if not finished_run(out, [script, ModelArgs(), lora, config]):  # a rerun skips a finished stage
        train(script, ModelArgs(), lora, config)
    return out


def dpo_stage(args: DemoArgs, out: Path, start: Path, form: str) -> Path:
    from halluc_rl.agents.dpo import DPOConfig, DPOScriptArgs, train

    script = DPOScriptArgs(task=args.task, num_problems=args.dpo_problems, num_samples=4, task_seed=args.seed,
                           form=form,
                           counter_ratio=args.counter_ratio, rebuild_every=0, min_pairs=8,
                           max_new_tokens=args.max_new_tokens or 128)
    config = DPOConfig(output_dir=str(out), max_steps=args.dpo_steps, per_device_train_batch_size=32,
                       learning_rate=args.dpo_learning_rate, lr_scheduler_type="constant", beta=args.dpo_beta,
                       logging_steps=5, save_strategy="no", report_to=[], use_cpu=True,
                       gradient_checkpointing=False, seed=args.seed)
    configs = [script, ModelArgs(model_name_or_path=str(start)), LoraArgs(use_lora=args.use_lora), config]
    if not finished_run(out, configs):
        train(*configs)
    return out


def ppo_stage(args: DemoArgs, out: Path, start: Path, backtrack: bool = True, **overrides) -> Path:
    from halluc_rl.agents.ppo import PPOArgs, train

    settings = dict(output_dir=str(out), task=args.task, task_seed=args.seed, num_problems=args.num_train_problems,
                    updates=args.ppo_updates, problems_per_update=16, group_size=4,
                    max_new_tokens=args.max_new_tokens or 96,
                    backtrack=backtrack, advantage=args.ppo_advantage, process_reward=args.ppo_process_reward,
                    process_credit=args.ppo_process_credit, process_weight=1.0, learning_rate=args.ppo_learning_rate,
                    kl_coef=args.kl_coef, backtrack_cost=args.backtrack_cost, save_every=25, seed=args.seed,
                    report_to="none")
    settings.update(overrides)
    configs = [PPOArgs(**settings), ModelArgs(model_name_or_path=str(start)), LoraArgs(use_lora=args.use_lora)]
    if not finished_run(out, configs):
        train(*configs)
    return out


def evaluate_stage(args: DemoArgs, policy: str | Path, folder: Path) -> dict:
    """The stage's evaluation, cached beside it (``eval.json``) for the same settings."""
    settings = {"problems": args.num_eval_problems, "samples": args.num_samples, "seed": args.seed, "task": args.task}
    if args.max_new_tokens:
        settings["max_new_tokens"] = args.max_new_tokens
    cache = folder / "eval.json"
    if cache.exists():
        saved = json.loads(cache.read_text())
        if saved.get("settings") == settings:
            return saved["metrics"]
    model, tokenizer, _ = load_policy(policy)
    problems = load_problems(args.task, "test", args.num_eval_problems, seed=args.seed)
    metrics = evaluate_policy(model, tokenizer, problems, num_samples=args.num_samples, seed=args.seed,
                              max_new_tokens=args.max_new_tokens or 128)
    atomic_write_json(cache, {"settings": settings, "metrics": metrics})
    return metrics


def pipeline(args: DemoArgs, root: Path) -> dict[str, Callable[[], Path | str]]:
    """The stages in order, each building on an earlier one's folder."""
    return {
        "base": lambda: "tiny",
        "plain_sft": lambda: sft_stage(args, root / "plain_sft", "none", "softmax"),
        "backtrack_sft": lambda: sft_stage(args, root / "backtrack_sft", "plausible", args.backtrack_head),
        "dpo": lambda: dpo_stage(args, root / "dpo", root / "backtrack_sft", args.dpo_form),
        "ppo": lambda: ppo_stage(args, root / "ppo", root / ("dpo" if args.dpo_steps else "backtrack_sft")),
        "control_ppo": lambda: ppo_stage(args, root / "control_ppo", root / "plain_sft", backtrack=False),
    }


def run_pipeline(args: DemoArgs, root: Path, stages: tuple[str, ...] = STAGES) -> dict[str, dict]:
    results, timings = {}, {}
    for name, make in pipeline(args, root).items():
        if name not in stages or (name == "dpo" and not args.dpo_steps):
            continue
        start = time.time()
        print(f"\n=== {name} ===", flush=True)
        folder = root / name
        policy = make()
        folder.mkdir(parents=True, exist_ok=True)
        results[name] = evaluate_stage(args, policy, folder)
        timings[name] = time.time() - start
        print(json.dumps({k: round(v, 3) for k, v in results[name].items() if k in KEYS and v is not None}))
    atomic_write_json(root / "timings.json", timings)
    return results


def plot_rl(root: Path, path: Path) -> Path | None:
    """Backtrack use and precision during RL (both arms' rollouts), and their accuracy."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    curves = {n: json.loads((root / n / "log_history.json").read_text()) for n in ("ppo", "control_ppo")
              if (root / n / "log_history.json").exists()}
    if not curves:
        return None
    fig = Figure(figsize=(11, 3.4))
    FigureCanvasAgg(fig)
    for i, key in enumerate(("rollout/accuracy", "rollout/backtrack_rate", "rollout/backtrack_precision")):
        ax = fig.add_subplot(1, 3, i + 1)
        for j, (name, rows) in enumerate(curves.items()):
            points = [(r["update"], r[key]) for r in rows if r.get(key) is not None]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, color=f"C{j}", alpha=0.25, linewidth=0.8)  # each update (64 answers): noisy
                window = 10
                smooth = [sum(ys[max(0, k - window + 1) : k + 1]) / len(ys[max(0, k - window + 1) : k + 1])
                          for k in range(len(ys))]
                ax.plot(xs, smooth, color=f"C{j}", label=f"{name} (mean of 10)")
        ax.set_title(key.split("/")[1].replace("_", " "))
        ax.set_xlabel("PPO update")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    return path


def demo(args: DemoArgs) -> int:
    if check_task(args.task) != "arithmetic":
        raise UsageError("task: the demo runs the offline arithmetic task (its oracle and its reference solutions)")
    check_positive(args, "num_train_problems", "num_eval_problems", "sft_epochs", "sft_learning_rate",
                   "ppo_updates", "ppo_learning_rate", "seeds")
    check_positive(args, "num_samples", "dpo_steps", "kl_coef", "backtrack_cost", "max_new_tokens",
                   allow_zero=("num_samples", "dpo_steps", "kl_coef", "backtrack_cost", "max_new_tokens"))
    if not args.use_lora and args.kl_coef:
        raise UsageError("use_lora: a fully fine-tuned policy has no adapter to disable for PPO's KL reference; add "
                         "--kl_coef 0 (or keep use_lora true)")
    for kind in args.error_kinds or [""]:
        check_choice("error_kinds", kind, PLAUSIBLE_KINDS)
    if args.ablate:
        from halluc_rl.agents.ablation import run_ablation

        return run_ablation(args)
    out = Path(args.output_dir)
    save_config(out / "demo_config.yaml", args)
    torch.manual_seed(args.seed)
    results = run_pipeline(args, out)
    title = "halluc-rl demo: the embedded tiny model on held-out arithmetic"
    paths = write_report(results, out, title=title)
    plot_rl(out, out / "rl.png")
    print_table(results, title="halluc-rl demo")
    print("\n" + summary(results))
    atomic_write_text(out / "summary.txt", summary(results) + "\n")
    print(f"report: {', '.join(str(p) for p in paths.values())}, {out / 'rl.png'}")
    return 0


def summary(results: dict[str, dict]) -> str:
    """What backtracking bought: the full pipeline against plain SFT and against the no-backtrack control."""
    def num(value) -> str:
        return "-" if value is None else f"{value:.3f}"

    lines = ["What backtracking bought (held-out problems):"]
    full, plain, control = results.get("ppo"), results.get("plain_sft"), results.get("control_ppo")
    if full and plain and control:
        for mode in ("greedy", "sampled"):
            key = f"accuracy_{mode}"
            ctrl = control[f"{key}_no_backtrack"]  # the control is trained, and judged, without the action
            lines.append(f"  {mode:<7} {num(full[key])} (full pipeline) vs {num(plain[key])} (plain SFT, "
                         f"{full[key] - plain[key]:+.3f}) vs {num(ctrl)} (the same RL without backtracking, "
                         f"{full[key] - ctrl:+.3f})")
        lines.append(f"  sampled backtracks: rate {num(full['sampled_backtrack_rate'])}, precision "
                     f"{num(full['sampled_backtrack_precision'])}, false-backtrack rate "
                     f"{num(full['sampled_false_backtrack_rate'])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    def run() -> int:
        (args,) = parse_cli([DemoArgs], argv, prog="halluc-rl demo")
        if args.backtrack_head not in ("factorized", "softmax"):
            raise UsageError(f"backtrack_head: unknown value {args.backtrack_head!r}; use factorized or softmax")
        return demo(args)

    return cli("halluc-rl demo", run)


if __name__ == "__main__":
    raise SystemExit(main())
