"""``halluc-rl demo --ablate --seeds 3``: every variant of the pipeline, each over several seeds.

Each row changes one thing from the default pipeline (``halluc-rl demo``) and reuses the stages it shares with it
(trained once per seed). The table gives each figure's mean and standard deviation over the seeds, with the command
that reproduces the row. Rows: plain SFT; backtrack SFT with each head; + DPO with each pair form; + PPO with each
advantage estimator and each process reward; and the no-backtrack control.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path

from halluc_rl.agents.demo import DemoArgs, dpo_stage, evaluate_stage, ppo_stage, sft_stage
from halluc_rl.runs import atomic_write_json, atomic_write_text

FIGURES: tuple[str, ...] = ("accuracy_greedy", "accuracy_sampled", "accuracy_sampled_no_backtrack",
                            "sampled_backtrack_rate", "sampled_backtrack_precision", "sampled_false_backtrack_rate",
                            "backtrack_precision", "sampled_failed_backtracks")


def rows(args: DemoArgs, root: Path) -> dict[str, tuple[str, callable]]:
    """Row name -> (what differs, the function that trains it and returns its policy folder)."""
    bt, dpo = root / "backtrack_sft", root / "dpo"

    def ppo(name: str, **kw):
        return lambda: ppo_stage(args, root / name, dpo, **kw)

    return {
        "plain_sft": ("no errors in SFT", lambda: sft_stage(args, root / "plain_sft", "none", "softmax")),
        "backtrack_sft (softmax)": ("backtrack_head softmax", lambda: sft_stage(args, root / "bt_sft_softmax",
                                                                               "plausible", "softmax")),
        "backtrack_sft (factorized)": ("the default SFT", lambda: sft_stage(args, bt, "plausible", "factorized")),
        "+ DPO (single-action)": ("the default DPO", lambda: dpo_stage(args, dpo, bt, "single")),
        "+ DPO (continuation)": ("dpo_form continuation", lambda: dpo_stage(args, root / "dpo_cont", bt,
                                                                          "continuation")),
        "+ PPO group, oracle": ("the default pipeline", ppo("ppo")),
        "+ PPO gae, oracle": ("advantage gae", ppo("ppo_gae", advantage="gae")),
        "+ PPO mc, oracle": ("advantage mc", ppo("ppo_mc", advantage="mc")),
        "+ PPO group, no PRM": ("process_reward none", ppo("ppo_noprm", process_reward="none")),
        "control (plain SFT + PPO, no backtrack)": (
            "backtrack masked", lambda: ppo_stage(args, root / "control_ppo", root / "plain_sft", backtrack=False)),
    }


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    return f"{mean:.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{mean:.3f}"


def run_ablation(args: DemoArgs) -> int:
    out = Path(args.output_dir)
    results: dict[str, list[dict]] = {}
    began = time.time()
    for seed in range(args.seed, args.seed + args.seeds):
        seeded = replace(args, seed=seed)
        root = out / f"seed{seed}"
        for name, (_, train) in rows(seeded, root).items():
            print(f"\n=== seed {seed}: {name} ({(time.time() - began) / 60:.1f} min so far) ===", flush=True)
            folder = train()
            metrics = evaluate_stage(seeded, folder, Path(folder))
            results.setdefault(name, []).append(metrics)
            atomic_write_json(out / "ablation.json", {"args": asdict(args), "results": results,
                                                      "minutes": (time.time() - began) / 60})
    table = ["| row | what differs | " + " | ".join(FIGURES) + " |", "|---|---|" + "---:|" * len(FIGURES)]
    for name, (differs, _) in rows(args, out).items():
        cells = [mean_std([m[k] for m in results.get(name, []) if m.get(k) is not None]) for k in FIGURES]
        table.append(f"| {name} | {differs} | " + " | ".join(cells) + " |")
    minutes = (time.time() - began) / 60
    text = (f"# Ablation: {args.seeds} seeds ({args.seed}..{args.seed + args.seeds - 1}), mean ± std, "
            f"{minutes:.0f} min\n\n" + "\n".join(table) + "\n")
    atomic_write_text(out / "ablation.md", text)
    print("\n" + text)
    print(json.dumps({"minutes": round(minutes, 1)}))
    return 0
