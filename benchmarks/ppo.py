"""PPO speed and memory: our PPO update against TRL's GRPOTrainer step, PPO's peak memory against SFT's, mc vs gae.

The embedded tiny policy on the offline task; each update samples 16 problems x 4 answers of at most 64 actions and
makes one optimisation pass over them (``epochs 1, minibatches 1`` for ours, ``num_iterations 1`` for TRL), so both
sides generate and train on the same number of tokens:

    python benchmarks/ppo.py [--updates 8] [--repeats 3]

* ``ppo_vs_grpo``: our generated tokens per second over whole updates (rollout, reference and old scores, update)
  / TRL ``GRPOTrainer``'s (plain ``model.generate`` sampling, its own log-probs), the same model and LoRA adapter.
  Target >= 1.0.
* ``ppo_peak_mem_mb`` / ``sft_peak_mem_mb``: on ``--memory_model`` (SmolLM2-135M by default: on the tiny model the
  allocator's noise is larger than the activations), the resident memory a PPO update adds at its peak (its
  rollout, reference and old scores and one pass over 8 problems x 4 answers of 48 actions, the loading of the
  policy subtracted), and an SFT step on a batch of 32 examples (the reference solutions, half with errors).
  Target: PPO <= 2x SFT.
* ``mc_vs_gae_cost``: seconds per update with the ``mc`` (VinePPO) estimator / with ``gae``.

Timed round-robin (one run of each per round, best of ``--repeats``). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

from halluc_rl.agents import ppo
from halluc_rl.args import LoraArgs, ModelArgs
from halluc_rl.config import parse_cli
from halluc_rl.data.problems import format_prompt
from halluc_rl.data.tasks import load_problems

PROBLEMS, GROUP, ACTIONS = 16, 4, 64


def ours(out: str, updates: int, advantage: str = "group", model: str = "tiny", problems: int = PROBLEMS,
         actions: int = ACTIONS) -> tuple[float, float]:
    """(seconds per update after the first, generated actions per update) of ``halluc-rl ppo``."""
    argv = ["--output_dir", out, "--updates", str(updates), "--problems_per_update", str(problems), "--group_size",
            str(GROUP), "--max_new_tokens", str(actions), "--epochs", "1", "--minibatches", "1", "--advantage",
            advantage, "--report_to", "none", "--save_every", "1000", "--resume", "false", "--mc_branches", "2",
            "--model_name_or_path", model]
    ppo.train(*parse_cli([ppo.PPOArgs, ModelArgs, LoraArgs], argv, prog="bench"))
    rows = json.loads(open(os.path.join(out, "log_history.json")).read())
    rows = rows[1:] or rows  # the first update warms up
    return (sum(r["time/update_s"] for r in rows) / len(rows), sum(r["rollout/actions"] for r in rows) / len(rows))


def trl_grpo(out: str, updates: int) -> tuple[float, float]:
    """(seconds per step after the first, generated tokens per step) of TRL's own GRPOTrainer."""
    import datasets
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from halluc_rl.modeling import load_model_and_tokenizer

    model, tok, _ = load_model_and_tokenizer("tiny")
    lora = LoraArgs()  # the same adapter; TRL's fused head cannot read PEFT's trainable-token rows, so none here
    peft_config = LoraConfig(r=lora.lora_r, lora_alpha=lora.lora_alpha, target_modules=lora.lora_target_modules,
                             task_type="CAUSAL_LM")
    problems = load_problems("arithmetic", "train", PROBLEMS * updates, None)
    data = datasets.Dataset.from_list([{"prompt": format_prompt(p.question, tok), "answer": p.answer}
                                       for p in problems])

    def correct(completions, answer, **kw):
        from halluc_rl.data.grading import reward

        return [reward(c, a) for c, a in zip(completions, answer)]

    times, tokens = [], []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **k):
            times.append(time.perf_counter() - self.t)

        def on_log(self, args, state, control, logs=None, **k):
            if logs and "completions/mean_length" in logs:
                tokens.append(logs["completions/mean_length"] * PROBLEMS * GROUP)

    config = GRPOConfig(output_dir=out, max_steps=updates, per_device_train_batch_size=PROBLEMS * GROUP,
                        num_generations=GROUP, max_completion_length=ACTIONS, num_iterations=1, beta=0.02,
                        learning_rate=1e-3, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                        bf16=False, disable_tqdm=True, activation_checkpointing=False, temperature=1.0, seed=0)
    trainer = GRPOTrainer(model=model, reward_funcs=correct, args=config, train_dataset=data, processing_class=tok,
                          callbacks=[Clock()], peft_config=peft_config)
    trainer.train()
    return sum(times[1:]) / len(times[1:]), sum(tokens[1:]) / len(tokens[1:])


MEMORY_SCRIPT = """
import json, resource, sys
from halluc_rl.agents import ppo, sft
from halluc_rl.config import LoraArgs, ModelArgs, parse_cli
kind, model, problems, out, step = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5] == "1"
if kind == "ppo":
    argv = ["--output_dir", out, "--updates", "1" if step else "0", "--problems_per_update", str(problems),
            "--group_size", "4", "--max_new_tokens", "48", "--epochs", "1", "--minibatches", "1",
            "--report_to", "none", "--save_every", "1000", "--resume", "false", "--model_name_or_path", model]
    if step:
        ppo.train(*parse_cli([ppo.PPOArgs, ModelArgs, LoraArgs], argv, prog="m"))
    else:
        from halluc_rl.data.tasks import load_problems
        from halluc_rl.modeling import load_start_policy
        load_start_policy(model, LoraArgs(), reference=True)
        load_problems("arithmetic", "train", 2000, None)
else:
    argv = ["--output_dir", out, "--num_train_problems", str(problems * 4), "--max_steps", "1",
            "--per_device_train_batch_size", str(problems * 4), "--report_to", "none", "--use_cpu", "true",
            "--save_strategy", "no", "--disable_tqdm", "true", "--resume", "false", "--error_rate", "0.5",
            "--model_name_or_path", model]
    trainer = sft.build_trainer(*parse_cli([sft.SFTScriptArgs, ModelArgs, LoraArgs, sft.SFTConfig], argv, "m"))
    if step:
        batch = next(iter(trainer.get_train_dataloader()))
        trainer.compute_loss(trainer.model, batch).backward()
print(json.dumps({"maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def step_memory(kind: str, model: str, problems: int, out: str) -> float:
    """Peak resident memory (MB) a PPO update or an SFT step adds: a fresh process's peak with the step, minus a
    fresh process's peak having loaded the same things without it."""
    import subprocess
    import sys

    peaks = []
    for step in ("0", "1"):
        proc = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, kind, model, str(problems), out + step, step],
                              capture_output=True, text=True, check=True)
        peaks.append(json.loads(proc.stdout.strip().splitlines()[-1])["maxrss_mb"])
    return peaks[1] - peaks[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory_model", default="smollm2-135m", help="the model whose memory is compared (a "
                        "larger one than tiny, so that activations, not the allocator's noise, dominate)")
    parser.add_argument("--memory_problems", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    best = {"ours": (1e9, 0.0), "grpo": (1e9, 0.0), "gae": (1e9, 0.0), "mc": (1e9, 0.0)}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):  # round-robin: drift in the machine's speed hits every candidate alike
            for name, run in (("ours", lambda d: ours(d, args.updates)), ("grpo", lambda d: trl_grpo(d, args.updates)),
                              ("gae", lambda d: ours(d, 3, "gae")), ("mc", lambda d: ours(d, 3, "mc"))):
                seconds, tokens = run(os.path.join(tmp, f"{name}{r}"))
                if seconds < best[name][0]:
                    best[name] = (seconds, tokens)
        sft_mb = step_memory("sft", args.memory_model, args.memory_problems, os.path.join(tmp, "sft"))
        ppo_mb = step_memory("ppo", args.memory_model, args.memory_problems, os.path.join(tmp, "ppo"))
    ours_tok_s, grpo_tok_s = best["ours"][1] / best["ours"][0], best["grpo"][1] / best["grpo"][0]
    results = {"problems": PROBLEMS, "group": GROUP, "max_actions": ACTIONS, "threads": torch.get_num_threads(),
               "memory_model": args.memory_model, "memory_batch": args.memory_problems * GROUP,
               "ours_update_s": best["ours"][0], "ours_actions_per_update": best["ours"][1],
               "grpo_step_s": best["grpo"][0], "grpo_tokens_per_step": best["grpo"][1],
               "ours_tok_s": ours_tok_s, "grpo_tok_s": grpo_tok_s, "ppo_vs_grpo": ours_tok_s / grpo_tok_s,
               "ppo_peak_mem_mb": ppo_mb, "sft_peak_mem_mb": sft_mb, "ppo_vs_sft_mem": ppo_mb / max(sft_mb, 1e-9),
               "gae_update_s": best["gae"][0], "mc_update_s": best["mc"][0],
               "mc_vs_gae_cost": best["mc"][0] / best["gae"][0]}
    print(f"PPO update {best['ours'][0]:.2f}s ({ours_tok_s:.0f} tok/s) vs TRL GRPO step {best['grpo'][0]:.2f}s "
          f"({grpo_tok_s:.0f} tok/s): {results['ppo_vs_grpo']:.2f}x")
    print(f"peak memory: PPO update {ppo_mb:.0f} MB, SFT step {sft_mb:.0f} MB; mc/gae cost {results['mc_vs_gae_cost']:.2f}")
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in results.items()}))


if __name__ == "__main__":
    main()
