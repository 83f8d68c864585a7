"""Retry data on ``deps``: continued pretraining of ``tiny-deps`` at several error rates, in both semantics, over
seeds, each evaluated on held-out problems (docs/efficacy.md, *Retry data*).

    python benchmarks/deps_retry_grid.py --out runs/retry-grid --seeds 0 1 2            # run (resumable) and report
    python benchmarks/deps_retry_grid.py --out runs/retry-grid --seeds 0 1 2 --report   # report only

Each cell is ``halluc-rl pretrain --task deps --init tiny-deps --error_rate R --error_kinds premature --semantics S
--seed K`` (rate 0 is the control: the same problems, batches and steps, no errors), then ``halluc-rl eval`` on
``deps`` and on ``deps:steps=4``. A cell whose evaluations exist is skipped, so a stopped grid resumes; cells of
other workers on the same folder are left alone (a lock folder each). The report is a table (mean ± std over
seeds) and ``accuracy_by_rate.png``; the last line printed is one JSON object of every cell.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

RATES = (0.0, 0.1, 0.25, 0.5)
SEMANTICS = ("rewind", "retry")
EVAL_TASKS = {"d": "deps", "s4": "deps:steps=4"}
CLI = [sys.executable, "-m", "halluc_rl"]  # the halluc-rl of this interpreter, activated or not
METRICS = ("accuracy_greedy", "accuracy_greedy_no_backtrack", "accuracy_sampled", "accuracy_sampled_no_backtrack",
           "backtrack_precision", "false_backtrack_rate")


def cells(seeds: list[int]) -> list[tuple[float, str, int]]:
    """(rate, semantics, seed); rate 0 once per seed (no errors: the semantics changes nothing)."""
    return [(r, s, k) for k in seeds for r in RATES for s in SEMANTICS if r > 0 or s == "rewind"]


def name(rate: float, semantics: str, seed: int) -> str:
    return f"r{rate:g}-{semantics}-s{seed}"


def run_cell(out: Path, rate: float, semantics: str, seed: int, steps: int) -> None:
    """Pretrain then evaluate one cell, unless done; one thread per process (run one worker per core)."""
    cell = name(rate, semantics, seed)
    if all((out / f"eval-{tag}" / cell / "results.json").exists() for tag in EVAL_TASKS):
        return
    try:
        (out / f"{cell}.lock").mkdir()
    except FileExistsError:
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        if not (out / cell / "config.json").exists():
            subprocess.run([*CLI, "pretrain", "--task", "deps", "--init", "tiny-deps", "--error_rate", str(rate),
                            "--error_kinds", "premature", "--semantics", semantics, "--batch_size", "64",
                            "--learning_rate", "1e-3", "--warmup_steps", "30", "--max_train_steps", str(steps),
                            "--eval_every", str(steps), "--target_accuracy", "1.0", "--seed", str(seed),
                            "--output_dir", str(out / cell)], env=env, check=True)
        for tag, task in EVAL_TASKS.items():
            subprocess.run([*CLI, "eval", "--policy", str(out / cell), "--task", task, "--num_problems", "300",
                            "--output_dir", str(out / f"eval-{tag}" / cell), "--name", cell], env=env, check=True)
    finally:  # a failed cell is retried by the next run, not left locked
        (out / f"{cell}.lock").rmdir()
    print(f"done {cell}", flush=True)


def collect(out: Path, seeds: list[int]) -> dict:
    """Every finished cell's metrics: ``{tag: {cell: {metric: value}}}``."""
    found: dict = {tag: {} for tag in EVAL_TASKS}
    for rate, semantics, seed in cells(seeds):
        cell = name(rate, semantics, seed)
        for tag in EVAL_TASKS:
            path = out / f"eval-{tag}" / cell / "results.json"
            if path.exists():
                row = json.loads(path.read_text())["results"][cell]
                found[tag][cell] = {m: row[m] for m in METRICS}
    return found


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {std:.3f} (n={len(values)})"


def report(out: Path, seeds: list[int]) -> dict:
    """Print a markdown table per evaluation task and save ``accuracy_by_rate.png``."""
    found = collect(out, seeds)
    for tag, task in EVAL_TASKS.items():
        print(f"\n{task} (300 test problems; mean ± std over seeds)\n")
        print("| rate | semantics | " + " | ".join(METRICS) + " |")
        print("|---" * (len(METRICS) + 2) + "|")
        for rate in RATES:
            for semantics in SEMANTICS if rate > 0 else ("none",):
                rows = [found[tag].get(name(rate, semantics if rate > 0 else "rewind", k)) for k in seeds]
                rows = [r for r in rows if r is not None]
                cols = [mean_std([r[m] for r in rows if r[m] is not None]) for m in METRICS]
                print(f"| {rate:g} | {semantics} | " + " | ".join(cols) + " |")
    plot(out, found, seeds)
    return found


def plot(out: Path, found: dict, seeds: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(EVAL_TASKS), figsize=(11, 4), sharey=True)
    for ax, (tag, task) in zip(axes, EVAL_TASKS.items()):
        for semantics in SEMANTICS:
            for metric, style in (("accuracy_greedy", "-o"), ("accuracy_sampled", "--s")):
                xs, ys, es = [], [], []
                for rate in RATES:
                    sem = semantics if rate > 0 else "rewind"
                    vals = [found[tag][c][metric] for c in (name(rate, sem, k) for k in seeds) if c in found[tag]]
                    if vals:
                        xs.append(rate)
                        ys.append(statistics.mean(vals))
                        es.append(statistics.stdev(vals) if len(vals) > 1 else 0.0)
                ax.errorbar(xs, ys, yerr=es, fmt=style, capsize=3, label=f"{semantics}, {metric.split('_')[1]}")
        ax.set(title=f"{task} (test)", xlabel="retry-data error rate (premature)", ylabel="answer accuracy")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "accuracy_by_rate.png", dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/retry-grid", help="folder of the cells, evaluations and report")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300, help="continued-pretraining steps per cell (batch 64)")
    parser.add_argument("--report", action="store_true", help="only report the cells already done")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.report:
        todo = cells(args.seeds)
        for i, (rate, semantics, seed) in enumerate(todo):
            print(f"[{i + 1}/{len(todo)}] {name(rate, semantics, seed)}", file=sys.stderr, flush=True)
            run_cell(out, rate, semantics, seed, args.steps)
    found = report(out, args.seeds)
    print(json.dumps(found))
    return 0


if __name__ == "__main__":
    sys.exit(main())
