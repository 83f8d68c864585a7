"""Evaluate a saved policy and add its row to a report (``halluc-rl eval``).

Accuracy greedy and sampled, each with backtracking on and off, plus backtrack precision and false-backtrack rate
(see :mod:`halluc_rl.evaluation`). Each run adds (or replaces) the row ``name`` in ``output_dir/results.json`` and
rewrites ``results.md`` and ``results.png``, so evaluating every stage into one directory builds the comparison::

    halluc-rl eval --policy tiny --name base --output_dir runs/eval
    halluc-rl eval --policy runs/sft_plain --name plain_sft --output_dir runs/eval
    halluc-rl eval --policy runs/sft_backtrack --name backtrack_sft --output_dir runs/eval
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from halluc_rl.args import SamplingArgs, SemanticsArgs, TaskArgs
from halluc_rl.backtrack import SEMANTICS
from halluc_rl.config import (
    UsageError,
    adopt_semantics,
    check_choice,
    check_device,
    check_model_name,
    check_output_dir,
    check_positive,
    check_task_args,
    cli,
    parse_cli,
    save_config,
)
from halluc_rl.data import tasks
from halluc_rl.data.problems import SPLITS, Problem
from halluc_rl.evaluation import evaluate_policy, load_results, print_table, write_report
from halluc_rl.registry import is_known_name


@dataclass
class EvalArgs(SamplingArgs, SemanticsArgs, TaskArgs):
    """What to evaluate, on which problems, how, and where the report goes (the task and the sampling temperature
    come from the shared blocks)."""

    policy: str = field(default="tiny", metadata={
        "help": "A saved policy directory (full model or PEFT adapter with its tokenizer), or 'tiny' for the "
                "embedded model."})
    split: str = field(default="test", metadata={"help": "Split to evaluate: train, validation or test."})
    num_problems: int = field(default=200, metadata={
        "help": "Problems to evaluate, from the start of the split (0: all; GSM8K only)."})
    num_samples: int = field(default=4, metadata={"help": "Samples per problem for sampled accuracy (0: skip)."})
    majority: int = field(default=0, metadata={
        "help": "maj@K: also sample K answers per problem and grade their majority answer (self-consistency), "
                "with the actions they spent per problem (0: skip)."})
    max_new_tokens: int = field(default=128, metadata={"help": "Actions per response, backtracks included."})
    batch_size: int = field(default=64, metadata={"help": "Sequences generated together."})
    loop_guard: int = field(default=1, metadata={
        "help": "Greedy runs: ban re-typing a token at a position after it was deleted there this many times (0: off)."})
    sampled_loop_guard: int = field(default=0, metadata={"help": "The same for sampled runs (0: off, the default)."})
    seed: int = field(default=0, metadata={"help": "Seeds sampling (the problems are fixed by the task)."})
    backtrack_bias: float = field(default=0.0, metadata={
        "help": "Added to the backtrack logit in the runs with backtracking on (negative: fewer backtracks; -inf: "
                "never backtrack, which makes those runs equal to the runs without backtracking).",
    })
    backtrack_budget: int | None = field(default=None, metadata={
        "help": "Backtracks allowed per episode in the runs with backtracking on (None: unlimited)."})
    stop_strings: list[str] = field(default_factory=list, metadata={
        "help": "Also stop a response once its text ends with one of these (EOS always stops it)."})
    output_dir: str = field(default="runs/eval", metadata={
        "help": "Report directory: results.json, results.md, results.png."})
    name: str | None = field(default=None, metadata={
        "help": "Row name in the report (default: the policy directory's name)."})
    append: bool = field(default=True, metadata={
        "help": "Add the row to the report already in output_dir (false: start a new report)."})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:N, or auto (CUDA when available)."})


def load_problems(args: EvalArgs) -> list[Problem]:
    """The first ``num_problems`` problems of the task's split."""
    return tasks.load_problems(args.task, args.split, args.num_problems, args.data_files, seed=args.task_seed,
                               validation_size=args.validation_size)


def load_eval_policy(policy: str):
    """(model, tokenizer, backtrack_id) of a saved policy, or the embedded model for ``tiny``.

    A full model whose tokenizer has no backtrack token (a base model) gets an untrained one, so its row still
    shows accuracy with and without backtracking.
    """
    from halluc_rl.modeling import load_policy

    return load_policy(policy, add_missing_backtrack=True)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def validate(args: EvalArgs) -> None:
    """Every check that needs no model (one-line UsageErrors), before anything is loaded or written."""
    if not is_known_name(args.policy) and not Path(args.policy).exists():
        raise UsageError(f"policy: {args.policy!r} does not exist. Give a saved policy directory (a full model or a "
                         "PEFT adapter saved with its tokenizer), or --policy tiny for the embedded model. To "
                         "evaluate a Hub model, download it first and pass its local directory.")
    check_model_name(args.policy, "policy")
    check_task_args(args, args.num_problems, "num_problems", split=args.split)
    check_choice("split", args.split, SPLITS)
    check_positive(args, "max_new_tokens", "batch_size", "temperature")
    check_positive(args, "num_problems", "num_samples", "loop_guard", "sampled_loop_guard", "backtrack_budget",
                   "majority", allow_zero=("num_problems", "num_samples", "loop_guard", "sampled_loop_guard",
                                           "backtrack_budget", "majority"))
    check_device(args.device)
    if args.semantics is not None:
        check_choice("semantics", args.semantics, SEMANTICS)
    check_output_dir(args.output_dir)


def main(argv: list[str] | None = None) -> int:
    return cli("halluc-rl eval", lambda: evaluate(parse_cli([EvalArgs], argv, prog="halluc-rl eval")[0]))


def evaluate(args: EvalArgs) -> int:
    """Validate, read the existing report (refusing a broken one before any work), evaluate, write atomically."""
    validate(args)
    name = args.name or (args.policy if is_known_name(args.policy) else Path(args.policy).resolve().name)
    out_dir = Path(args.output_dir)
    try:
        results = load_results(out_dir) if args.append else {}
        problems = load_problems(args)
    except (ValueError, FileNotFoundError, ConnectionError) as err:
        raise UsageError(" ".join(str(err).split())) from err
    try:
        model, tokenizer, _ = load_eval_policy(args.policy)
    except (OSError, ValueError) as err:  # no model in that folder, another base, non-finite weights
        raise UsageError(" ".join(str(err).split())) from err
    semantics = adopt_semantics(model, args)  # one line if the policy was trained in another semantics
    model.to(_device(args.device))
    print(f"evaluating {args.policy} as {name!r} in the {semantics} semantics on {len(problems)} {args.task} "
          f"{args.split} problems")
    metrics = evaluate_policy(
        model, tokenizer, problems, num_samples=args.num_samples, temperature=args.temperature,
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, loop_guard=args.loop_guard,
        sampled_loop_guard=args.sampled_loop_guard, seed=args.seed, stop_strings=tuple(args.stop_strings),
        backtrack_bias=args.backtrack_bias, backtrack_budget=args.backtrack_budget, majority=args.majority,
    )
    results[name] = {**metrics, "semantics_override": args.override_semantics and args.semantics is not None}
    safe_name = re.sub(r"[^\w.-]+", "_", name)
    save_config(out_dir / f"eval_config_{safe_name}.yaml", args)
    title = f"halluc-rl evaluation: {args.task} {args.split}"
    paths = write_report(results, out_dir, title=title)
    print_table(results, title=title)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
