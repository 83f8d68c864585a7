"""Held-out accuracy and the error kinds of a model's wrong answers on the ``deps`` task (docs/tasks.md).

    OMP_NUM_THREADS=1 python benchmarks/deps_eval.py MODEL_DIR --task deps:vars=5 --num_problems 300 --samples 1

Greedy and sampled (temperature 1) answers, backtracking off, on test-split problems; prints one JSON object with
``greedy`` and ``sampled`` :func:`~halluc_rl.data.deps_check.error_table` results. ``--copy_detail`` adds where the
greedy copy mistakes fall (``copy_detail``: counts by line, by the wrong token's place in the right-hand side, and
by where that token came from).
"""

from __future__ import annotations

import argparse
import collections
import json
import time

import torch

from halluc_rl.data.deps import parse_question
from halluc_rl.data.deps_check import check_solution, error_table
from halluc_rl.data.problems import encode_problem
from halluc_rl.data.tasks import load_problems
from halluc_rl.generation import generate
from halluc_rl.modeling import load_policy


def answers(model, tokenizer, problems, do_sample: bool, seed: int, batch_size: int = 50) -> tuple[list, list]:
    """(texts, finished) of one answer per problem, backtracking off."""
    texts, finished = [], []
    longest = max(len(encode_problem(p, tokenizer)[1]) for p in problems)
    generator = torch.Generator().manual_seed(seed) if do_sample else None
    for i in range(0, len(problems), batch_size):
        chunk = problems[i : i + batch_size]
        out = generate(model, tokenizer, [encode_problem(p, tokenizer)[0] for p in chunk],
                       max_new_tokens=longest + 16, do_sample=do_sample, temperature=1.0,
                       backtrack_bias=float("-inf"), generator=generator)
        texts += out.texts
        finished += out.finished.tolist()
    return texts, finished


def copy_detail(questions: list[str], texts: list[str], finished: list[bool]) -> dict[str, int]:
    """Where the copy mistakes fall, as ``"line L / PLACE / SOURCE": count``.

    PLACE is the first wrong token of the right-hand side (``first``: a constant or the first input, ``operator``,
    ``second``: the second input or constant). SOURCE says whether that token stands at the same place in another
    definition: ``same-input`` (one that reads the same first input), ``other`` (any other) or ``none``.
    """
    counts: collections.Counter = collections.Counter()
    for question, text, done in zip(questions, texts, finished):
        verdict = check_solution(question, text, bool(done))
        if verdict.on_track or verdict.kind != "copy":
            continue
        definitions = parse_question(question).definitions
        line = text.strip().split("\n")[verdict.step]
        right, written = definitions[line[0]].split(" "), line[4:].split(" ")
        place = next(i for i in range(len(right)) if i >= len(written) or written[i] != right[i])
        token = written[place] if place < len(written) else None
        others = [d.split(" ") for n, d in definitions.items() if n != line[0]]
        others = [d for d in others if len(d) > place and d[place] == token]
        source = ("same-input" if place and any(d[0] == right[0] for d in others) else "other") if others else "none"
        counts[f"line {verdict.step + 1} / {('first', 'operator', 'second')[place]} / {source}"] += 1
    return dict(sorted(counts.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a saved policy (full model or adapter), or tiny-deps")
    parser.add_argument("--task", default="deps")
    parser.add_argument("--num_problems", type=int, default=300)
    parser.add_argument("--samples", type=int, default=1, help="sampled answers per problem (0: greedy only)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--copy_detail", action="store_true", help="also count where the greedy copy mistakes fall")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer, _ = load_policy(args.model)
    model.eval()
    problems = load_problems(args.task, args.split, args.num_problems)
    start = time.time()
    result = {"model": args.model, "task": args.task, "split": args.split}
    texts, done = answers(model, tokenizer, problems, False, 0)
    result["greedy"] = error_table([p.question for p in problems], texts, [p.answer for p in problems], done)
    if args.copy_detail:
        result["copy_detail"] = copy_detail([p.question for p in problems], texts, done)
    if args.samples:
        many = [p for p in problems for _ in range(args.samples)]
        texts, done = answers(model, tokenizer, many, True, 0)
        result["sampled"] = error_table([p.question for p in many], texts, [p.answer for p in many], done)
    result["seconds"] = round(time.time() - start, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
