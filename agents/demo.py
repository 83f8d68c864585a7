"""``halluc-rl demo``: the whole pipeline on the embedded default, offline, on a laptop CPU.

The shipped tiny model of the task (``tiny`` on arithmetic, ``tiny-deps`` with ``--task deps``), then two arms
trained on the same problems with the same budget:

* **backtracking**: masked-error SFT (the policy learns the mechanics of ``<|BACKTRACK|>``), token-level DPO at its
  own errors, then PPO with the oracle's process rewards;
* **control**: plain SFT, then the same PPO with the backtrack action masked everywhere.

Gains from RL alone then show in both arms; only what backtracking bought separates them. Every stage is evaluated
on held-out problems, greedy and sampled at temperature 1, with backtracking on and off. Writes
``runs/demo/results.{json,md}``, ``results.png`` (accuracy by stage) and ``rl.png`` (backtrack use and precision
during RL). A rerun skips stages already finished with the same settings, and resumes interrupted ones.

Each stage's settings are in ``configs/demo/`` (``sft.yaml``, ``dpo.yaml``, ``ppo.yaml``, ``prm.yaml``; on
``deps``, ``configs/demo/deps/``), with the options of :class:`DemoArgs` on top (:mod:`halluc_rl.agents.stages`);
``--stage_configs DIR`` reads another folder. On ``deps`` every stage is evaluated on ``deps:steps=4``, one needed
line longer than any training problem (``--eval_task``).

``halluc-rl demo --ablate --seeds 3`` runs every variant row (``ABLATION``) over three seeds and writes
``ablation.{json,md}`` with the mean and standard deviation of each figure, and the command of each row.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from halluc_rl.agents.ablation import rows, run_ablation
from halluc_rl.agents.stages import (
    TASK_DEFAULTS,
    DemoArgs,
    base_model,
    check_stage_configs,
    dpo_stage,
    equal_token_votes,
    evaluate_stage,
    majority_stage,
    ppo_stage,
    saved_evaluation,
    sft_stage,
)
from halluc_rl.atomic import atomic_write_json, atomic_write_text
from halluc_rl.backtrack import SEMANTICS
from halluc_rl.config import (
    UsageError,
    check_choice,
    check_output_dir,
    check_positive,
    check_task,
    cli,
    parse_cli,
    save_config,
)
from halluc_rl.data.deps_errors import check_error_kinds
from halluc_rl.losses import BACKTRACK_HEADS
from halluc_rl.reporting import (
    demo_summary,
    plot_rl,
    print_table,
    run_environment,
    summary_figures,
    write_report,
)

STAGES: tuple[str, ...] = ("base", "plain_sft", "backtrack_sft", "dpo", "ppo", "control_ppo")
KEYS: tuple[str, ...] = ("accuracy_greedy", "accuracy_sampled", "accuracy_greedy_no_backtrack",
                         "accuracy_sampled_no_backtrack", "backtrack_rate", "backtrack_precision",
                         "false_backtrack_rate", "sampled_backtrack_rate", "sampled_backtrack_precision",
                         "sampled_false_backtrack_rate", "sampled_failed_backtracks")


def pipeline(args: DemoArgs, root: Path) -> dict[str, Callable[[], Path | str]]:
    """The stages in order, each building on an earlier one's folder."""
    return {
        "base": lambda: base_model(args),
        "plain_sft": lambda: sft_stage(args, root / "plain_sft", "none", "softmax"),
        "backtrack_sft": lambda: sft_stage(args, root / "backtrack_sft", "plausible", args.backtrack_head),
        "dpo": lambda: dpo_stage(args, root / "dpo", root / "backtrack_sft", args.dpo_form),
        "ppo": lambda: ppo_stage(args, root / "ppo", root / ("dpo" if args.dpo_steps else "backtrack_sft")),
        "control_ppo": lambda: ppo_stage(args, root / "control_ppo", root / "plain_sft", backtrack=False),
    }


def run_pipeline(args: DemoArgs, root: Path, stages: tuple[str, ...] = STAGES) -> dict[str, dict]:
    """Train and evaluate ``stages`` in order. A stage left out that an earlier run (``--stages``) finished with
    the same evaluation settings keeps its row, so runs of a few stages at a time add up to one report."""
    results, timings = {}, {}
    if (root / "timings.json").exists():
        timings = json.loads((root / "timings.json").read_text())
    for name, make in pipeline(args, root).items():
        if name == "dpo" and not args.dpo_steps:
            continue
        if name not in stages:
            saved = saved_evaluation(args, root / name)
            if saved is not None:
                results[name] = saved
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


def demo(args: DemoArgs) -> int:
    if check_task(args.task) not in TASK_DEFAULTS:
        raise UsageError(f"task: the demo runs the offline tasks with an oracle and an embedded model "
                         f"({', '.join(TASK_DEFAULTS)}); {args.task!r} is not one")
    if check_task(args.eval_task, "eval_task") != check_task(args.task):
        raise UsageError(f"eval_task: {args.eval_task!r} is another task than {args.task!r}; give settings of the "
                         "same task (deps:steps=4)")
    check_positive(args, "num_train_problems", "num_eval_problems", "sft_epochs", "sft_learning_rate",
                   "ppo_updates", "ppo_learning_rate", "seeds")
    check_positive(args, "num_samples", "dpo_steps", "kl_coef", "backtrack_cost", "max_new_tokens",
                   allow_zero=("num_samples", "dpo_steps", "kl_coef", "backtrack_cost", "max_new_tokens"))
    if not args.use_lora and args.kl_coef:
        raise UsageError("use_lora: a fully fine-tuned policy has no adapter to disable for PPO's KL reference; add "
                         "--kl_coef 0 (or keep use_lora true)")
    try:
        check_error_kinds(args.task, args.error_kinds or [""])
    except ValueError as err:
        raise UsageError(str(err)) from err
    check_choice("semantics", args.semantics, SEMANTICS)
    for stage in args.stages:
        check_choice("stages", stage, STAGES)
    check_stage_configs(args)
    if args.rows and not args.ablate:
        raise UsageError("rows: groups of ablation rows; add --ablate, or drop --rows")
    if args.ablate:
        rows(args, Path(args.output_dir))  # an unknown group is a one-line error before anything runs
    check_output_dir(args.output_dir)
    if args.ablate:
        return run_ablation(args)
    out = Path(args.output_dir)
    save_config(out / "demo_config.yaml", args)
    torch.manual_seed(args.seed)
    results = run_pipeline(args, out, tuple(args.stages) or STAGES)
    majority, summary = None, None
    compared = {"ppo", "control_ppo"} <= set(results)
    if args.num_samples and compared:  # the control's majority vote at the backtracking arm's tokens (self-consistency)
        k = equal_token_votes(results["ppo"], results["control_ppo"])
        print(f"\n=== control_ppo: majority of {k} sampled answers (equal tokens) ===", flush=True)
        majority = majority_stage(args, out / "control_ppo", out / "control_ppo", k)
    if compared:
        summary = summary_figures(results, task=args.task, semantics=args.semantics, majority=majority)
    title = f"halluc-rl demo: {base_model(args)} on held-out {args.eval_task}"
    paths = write_report(results, out, title=title, summary=summary)
    rl_plot = plot_rl(out, out / "rl.png")
    print_table(results, title="halluc-rl demo")
    env = run_environment()
    atomic_write_json(out / "environment.json", env)
    text = demo_summary(results, env, majority)
    print("\n" + text)
    atomic_write_text(out / "summary.txt", text + "\n")
    print(f"report: {', '.join(str(p) for p in [*paths.values(), rl_plot] if p)}")
    return 0


summary = demo_summary  # the name it had here


def main(argv: list[str] | None = None) -> int:
    def run() -> int:
        (args,) = parse_cli([DemoArgs], argv, prog="halluc-rl demo")
        if args.backtrack_head is not None and args.backtrack_head not in BACKTRACK_HEADS:
            raise UsageError(f"backtrack_head: unknown value {args.backtrack_head!r}; use one of {BACKTRACK_HEADS}")
        return demo(args)

    return cli("halluc-rl demo", run)


if __name__ == "__main__":
    raise SystemExit(main())
