"""``halluc-rl demo --ablate --seeds 3``: every variant of the pipeline, each over several seeds.

Each row changes one thing from the default pipeline (``halluc-rl demo``) and reuses the stages it shares with it
(trained once per seed). Every (seed, row) pair is a task for a pool of worker processes, one per core and one
thread each (tiny models gain nothing from a second thread); a task starts once the rows it builds on are done. The
table gives each figure's mean and standard deviation over the seeds; ``ablation.json`` keeps every seed's figures,
the settings and the time taken.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, replace
from pathlib import Path

import torch

from halluc_rl.agents.stages import (
    DemoArgs,
    dpo_stage,
    evaluate_stage,
    ppo_stage,
    pretrain_stage,
    prm_stage,
    sft_stage,
)
from halluc_rl.atomic import atomic_write_json, atomic_write_text
from halluc_rl.config import UsageError
from halluc_rl.reporting import ablation_table, mean_std, plot_ablation, plot_curves  # noqa: F401  (mean_std: its old home)

FIGURES: tuple[str, ...] = ("accuracy_greedy", "accuracy_sampled", "accuracy_sampled_no_backtrack",
                            "sampled_backtrack_rate", "sampled_backtrack_precision", "sampled_false_backtrack_rate",
                            "backtrack_rate", "backtrack_precision")

MC_COST = 3  # an mc update costs >= 3 group updates (benchmarks/ppo.py: mc_vs_gae_cost 3.06), more as backtracks spread


def rows(args: DemoArgs, root: Path) -> dict[str, tuple[str, Callable[[], Path]]]:
    """Row name -> (what differs from the default pipeline, the function that trains it, returning its folder):
    the rows of the task's groups in ``args.rows`` (all of them when empty)."""
    task = args.task.partition(":")[0]
    groups = deps_rows(args, root) if task == "deps" else {"stages": arithmetic_rows(args, root)}
    unknown = [g for g in args.rows if g not in groups]
    if unknown:
        raise UsageError(f"rows: unknown group {unknown[0]!r} on {task}; use {', '.join(groups)}")
    return {name: row for group, table in groups.items() if not args.rows or group in args.rows
            for name, row in table.items()}


def arithmetic_rows(args: DemoArgs, root: Path) -> dict[str, tuple[str, Callable[[], Path]]]:
    """The arithmetic ablation: each row changes one thing from the default pipeline."""
    bt, dpo = root / "backtrack_sft", root / "dpo"
    mc_updates = max(1, round(args.ppo_updates / MC_COST))

    def ppo(name: str, **kw):
        return lambda: ppo_stage(args, root / name, dpo, **kw)

    return {
        "plain SFT": ("no errors in SFT", lambda: sft_stage(args, root / "plain_sft", "none", "softmax")),
        "backtrack SFT, softmax head": ("backtrack_head softmax",
                                        lambda: sft_stage(args, root / "bt_sft_softmax", "plausible", "softmax")),
        "backtrack SFT, factorized head": ("(the default SFT)",
                                           lambda: sft_stage(args, bt, "plausible", "factorized")),
        "+ DPO, single-action pairs": ("(the default DPO)", lambda: dpo_stage(args, dpo, bt, "single")),
        "+ DPO, continuation pairs": ("dpo_form continuation",
                                      lambda: dpo_stage(args, root / "dpo_continuation", bt, "continuation")),
        "+ PPO group, oracle PRM": ("(the default pipeline)", ppo("ppo")),
        "+ PPO gae, oracle PRM": ("ppo_advantage gae", ppo("ppo_gae", advantage="gae")),
        "+ PPO mc, oracle PRM": (f"ppo_advantage mc, {mc_updates} updates (about the compute of the others' "
                                 f"{args.ppo_updates})", ppo("ppo_mc", advantage="mc", mc_branches=2,
                                                             updates=mc_updates)),
        "+ PPO group, no PRM": ("ppo_process_reward none", ppo("ppo_no_prm", process_reward="none")),
        "+ PPO group, trained PRM": ("ppo_process_reward prm", lambda: ppo_stage(
            args, root / "ppo_trained_prm", dpo, process_reward="prm", process_credit="return",
            prm_path=str(prm_stage(args, root / "prm", bt)))),
        "+ PPO group, implicit PRM": ("ppo_process_reward implicit (the DPO policy)",
                                      ppo("ppo_implicit_prm", process_reward="implicit", prm_path=str(dpo),
                                          process_credit="return")),
        "control: plain SFT + PPO, backtrack masked": (
            "the no-backtrack control", lambda: ppo_stage(args, root / "control_ppo", root / "plain_sft",
                                                          backtrack=False)),
    }


FULL_FT_LEARNING_RATE = 1e-3  # full fine-tuning of tiny-deps: LoRA's 2e-3 is too high for every weight (pilot)
RETRY_RATES: tuple[float, ...] = (0.1, 0.25, 0.5)
SEMANTICS: tuple[str, ...] = ("rewind", "retry")


def retry_row(rate: float, semantics: str) -> str:
    """A retry-data row's name; rate 0 is the clean control, one row that both semantics' curves start from."""
    return "retry data, rate 0" if rate == 0 else f"retry data, rate {rate:g}, {semantics}"


def deps_rows(args: DemoArgs, root: Path) -> dict[str, dict[str, tuple[str, Callable[[], Path]]]]:
    """The deps ablation (docs/efficacy.md), by group. ``stages``: each stage added in turn, in both semantics
    (masked-error SFT with LoRA and with full fine-tuning, then DPO and PPO on the LoRA policy), with the
    no-backtrack control of each. ``pretrain``: retry data in continued pretraining at each error rate, both
    semantics, against the clean control."""
    full = replace(args, use_lora=False, sft_learning_rate=FULL_FT_LEARNING_RATE)
    stages: dict[str, tuple[str, Callable[[], Path]]] = {
        "plain SFT": ("no errors in SFT (control 1)", lambda: sft_stage(args, root / "plain_sft", "none",
                                                                         args.backtrack_head)),
        "full FT: plain SFT": (f"full fine-tuning, lr {FULL_FT_LEARNING_RATE:g} (control 1)",
                               lambda: sft_stage(full, root / "full_plain_sft", "none", args.backtrack_head))}
    for sem in ("rewind", "retry"):
        arm = replace(args, semantics=sem)
        stages[f"masked SFT, {sem}"] = (f"semantics {sem}", lambda a=arm, s=sem: sft_stage(
            a, root / f"sft_{s}", "plausible", a.backtrack_head))
        stages[f"full FT: masked SFT, {sem}"] = (f"semantics {sem}, full fine-tuning", lambda s=sem: sft_stage(
            replace(full, semantics=s), root / f"full_sft_{s}", "plausible", args.backtrack_head))
        stages[f"+ DPO, {sem}"] = (f"semantics {sem}", lambda a=arm, s=sem: dpo_stage(
            a, root / f"dpo_{s}", root / f"sft_{s}", a.dpo_form))
        stages[f"+ PPO oracle, {sem}"] = (f"semantics {sem}", lambda a=arm, s=sem: ppo_stage(
            a, root / f"ppo_{s}", root / (f"dpo_{s}" if a.dpo_steps else f"sft_{s}")))
    stages["control: plain SFT + PPO, backtrack masked"] = (
        "the no-backtrack control of PPO", lambda: ppo_stage(args, root / "control_ppo", root / "plain_sft",
                                                             backtrack=False))
    retry = {retry_row(0, ""): ("clean continued pretraining (control 1)",
                                lambda: pretrain_stage(args, root / "retry_r0", 0.0, "rewind"))}
    for rate in RETRY_RATES:
        for sem in SEMANTICS:
            retry[retry_row(rate, sem)] = (f"error rate {rate:g}, semantics {sem}", lambda r=rate, s=sem:
                                           pretrain_stage(args, root / f"retry_r{r:g}_{s}", r, s))
    return {"stages": stages, "pretrain": retry}


# The rows a row starts from (their folders must be trained first), and each row's minutes on one core, measured
# in the 3-seed ablation of docs/efficacy.md (deps: in its pilots): only to order the work, the longest chain first.
NEEDS: dict[str, dict[str, tuple[str, ...]]] = {
    "arithmetic": {
        "+ DPO, single-action pairs": ("backtrack SFT, factorized head",),
        "+ DPO, continuation pairs": ("backtrack SFT, factorized head",),
        **{row: ("+ DPO, single-action pairs",) for row in (
            "+ PPO group, oracle PRM", "+ PPO gae, oracle PRM", "+ PPO mc, oracle PRM", "+ PPO group, no PRM",
            "+ PPO group, trained PRM", "+ PPO group, implicit PRM")},
        "control: plain SFT + PPO, backtrack masked": ("plain SFT",),
    },
    "deps": {
        **{f"+ DPO, {sem}": (f"masked SFT, {sem}",) for sem in ("rewind", "retry")},
        **{f"+ PPO oracle, {sem}": (f"+ DPO, {sem}",) for sem in ("rewind", "retry")},
        "control: plain SFT + PPO, backtrack masked": ("plain SFT",),
    },
}
MINUTES: dict[str, dict[str, float]] = {
    "arithmetic": {
        "plain SFT": 0.9, "backtrack SFT, softmax head": 1.5, "backtrack SFT, factorized head": 1.3,
        "+ DPO, single-action pairs": 2.1, "+ DPO, continuation pairs": 7.2, "+ PPO group, oracle PRM": 3.2,
        "+ PPO gae, oracle PRM": 3.4, "+ PPO mc, oracle PRM": 3.3, "+ PPO group, no PRM": 4.2,
        "+ PPO group, trained PRM": 5.4, "+ PPO group, implicit PRM": 12.1,
        "control: plain SFT + PPO, backtrack masked": 2.8,
    },
    "deps": {
        "plain SFT": 1.5, "masked SFT, rewind": 1.5, "masked SFT, retry": 1.5, "full FT: plain SFT": 2.5,
        "full FT: masked SFT, rewind": 2.5, "full FT: masked SFT, retry": 2.5, "+ DPO, rewind": 1.5,
        "+ DPO, retry": 1.5, "+ PPO oracle, rewind": 3.5, "+ PPO oracle, retry": 3.5,
        "control: plain SFT + PPO, backtrack masked": 3.5, **dict.fromkeys(
            [retry_row(r, s) for r in (0, *RETRY_RATES) for s in SEMANTICS], 3.5),
    },
}


def priority(name: str, task: str = "arithmetic") -> float:
    """Minutes of the longest chain of rows from ``name`` to the end: rows that hold up the most work go first
    (critical-path list scheduling)."""
    needs = NEEDS[task]
    after = [row for row, before in needs.items() if name in before]
    return MINUTES[task].get(name, 1.0) + max((priority(row, task) for row in after), default=0.0)


def ready(pending: list[tuple[int, str]], done: dict[int, dict[str, dict]], task: str = "arithmetic"
          ) -> tuple[list[tuple[int, str]], list[tuple[int, str, str]]]:
    """Of the pending (seed, row) tasks: those whose needed rows have finished, most urgent first, and those that
    cannot run because a needed row failed (with that row's name)."""
    runnable, blocked = [], []
    for seed, name in pending:
        needs = NEEDS[task].get(name, ())
        failed = [n for n in needs if "error" in done[seed].get(n, {})]
        if failed:
            blocked.append((seed, name, failed[0]))
        elif all(n in done[seed] for n in needs):
            runnable.append((seed, name))
    runnable.sort(key=lambda task_: (-priority(task_[1], task), task_[0]))
    return runnable, blocked


def one_row(args: DemoArgs, seed: int, name: str) -> dict:
    """One row for one seed, in a worker process with one thread: train it (its needed rows are done), evaluate it.
    A row that fails is recorded with its error, never silently dropped: the other rows still run."""
    torch.set_num_threads(1)
    seeded = replace(args, seed=seed)
    try:
        folder = rows(seeded, Path(args.output_dir) / f"seed{seed}")[name][1]()
        return evaluate_stage(seeded, folder, folder)
    except Exception as err:
        return {"error": f"{type(err).__name__}: {err}"}


def run_ablation(args: DemoArgs) -> int:
    """Every (seed, row) task on a pool of one-thread workers, one per core. A task starts once the rows it starts
    from are done for its seed, the longest chain first, so both cores stay busy to the end. Each finished row is
    saved at once (``seed<N>/results.json``); a rerun skips the stages already trained."""
    began = time.time()
    seeds = list(range(args.seed, args.seed + args.seeds))
    names = list(rows(args, Path(args.output_dir)))
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the workers
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    pending = [(seed, name) for seed in seeds for name in names]
    done: dict[int, dict[str, dict]] = {seed: {} for seed in seeds}
    total, workers = len(pending), min(len(pending), cores)

    def record(seed: int, name: str, metrics: dict) -> None:
        done[seed][name] = metrics
        atomic_write_json(Path(args.output_dir) / f"seed{seed}" / "results.json",
                          {n: done[seed][n] for n in names if n in done[seed]})
        status = f"failed: {metrics['error']}" if "error" in metrics else "done"
        print(f"[{(time.time() - began) / 60:5.1f} min] {sum(map(len, done.values()))}/{total} seed {seed}: "
              f"{name} {status}", flush=True)

    with ProcessPoolExecutor(max_workers=workers) as pool:
        running: dict = {}
        while pending or running:
            runnable, blocked = ready(pending, done, args.task.partition(":")[0])
            for seed, name, failed in blocked:
                pending.remove((seed, name))
                record(seed, name, {"error": f"not run: it starts from {failed!r}, which failed"})
            for seed, name in runnable[: workers - len(running)]:
                pending.remove((seed, name))
                running[pool.submit(one_row, args, seed, name)] = (seed, name)
                print(f"[{(time.time() - began) / 60:5.1f} min] seed {seed}: {name} started", flush=True)
            if not running:  # cannot happen while NEEDS names only rows of the table
                raise RuntimeError(f"ablation: no task can start; pending {pending}")
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                record(*running.pop(future), future.result())
    text = write_summary(args, done, (time.time() - began) / 60)
    print("\n" + text)
    print(json.dumps({"minutes": round((time.time() - began) / 60, 1), "seeds": seeds, "workers": workers}))
    return 0


def write_summary(args: DemoArgs, by_seed: dict[int, dict[str, dict]], minutes: float) -> str:
    """``ablation.json`` (every seed's figures), ``ablation.md`` (mean ± std per row, failed seeds named) and
    ``ablation.png``; returns the markdown."""
    out, seeds = Path(args.output_dir), list(by_seed)
    names = list(rows(args, out))
    results = {name: [by_seed[s].get(name, {"error": "not run"}) for s in seeds] for name in names}
    atomic_write_json(out / "ablation.json", {"args": asdict(args), "seeds": seeds, "minutes": minutes,
                                              "results": results})
    differs = {name: what for name, (what, _) in rows(args, out).items()}
    text = (f"# Ablation: seeds {seeds[0]}..{seeds[-1]}, mean ± std over seeds, {minutes:.0f} min\n\n"
            + ablation_table(results, differs, FIGURES) + "\n")
    atomic_write_text(out / "ablation.md", text)
    plot_ablation(results, out / "ablation.png")
    curves = rate_curves(results)
    if curves:
        plot_curves(curves, out / "accuracy_by_rate.png", xlabel="retry-data error rate (premature steps)",
                    title=f"{args.eval_task or args.task} (test), mean ± std over seeds")
    return text


def rate_curves(results: dict[str, list[dict]]) -> dict[str, dict[float, list[float]]]:
    """Accuracy against the retry-data error rate, one curve per semantics and decoding (``{"rewind, greedy":
    {rate: [one value per seed]}}``); empty when the retry-data rows were not run."""
    if not any(retry_row(rate, sem) in results for rate in RETRY_RATES for sem in SEMANTICS):
        return {}
    return {f"{sem}, {decoding}": {rate: [m[key] for m in results.get(retry_row(rate, sem), []) if "error" not in m]
                                   for rate in (0.0, *RETRY_RATES)}
            for sem in SEMANTICS for decoding, key in (("greedy", "accuracy_greedy"),
                                                       ("sampled", "accuracy_sampled"))}
