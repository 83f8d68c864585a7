"""Held-out accuracy and the error kinds of a model's wrong answers on the ``deps`` task (docs/tasks.md).

    OMP_NUM_THREADS=1 python benchmarks/deps_eval.py MODEL_DIR --task deps:vars=5 --num_problems 300 --samples 1

Greedy and sampled (temperature 1) answers, backtracking off, on test-split problems; prints one JSON object with
``greedy`` and ``sampled`` :func:`~halluc_rl.data.deps_check.error_table` results. ``--copy_detail`` adds where the
greedy copy mistakes fall (``copy_detail``: counts by line, by the wrong token's place in the right-hand side, and
by where that token came from). ``--planted`` adds how a backtracking policy meets a premature step planted in the
reference (``planted``: its mean backtrack probability right after the planted name, how often backtracking is the
greedy choice there, and its mean backtrack probability at the reference's own tokens), and the same right after
the premature steps of its own greedy answers (``*_own``).
"""

from __future__ import annotations

import argparse
import collections
import json
import time

import torch

from halluc_rl.data.deps import parse_question
from halluc_rl.data.deps_check import check_solution, error_table, first_wrong_token
from halluc_rl.data.deps_errors import DepsErrors
from halluc_rl.data.errors import build_examples
from halluc_rl.data.problems import encode_problem
from halluc_rl.data.tasks import load_problems
from halluc_rl.generation import generate
from halluc_rl.modeling import load_policy


def answers(model, tokenizer, problems, do_sample: bool, seed: int, batch_size: int = 50) -> tuple[list, list, list]:
    """(texts, finished, response ids) of one answer per problem, backtracking off."""
    texts, finished, sequences = [], [], []
    longest = max(len(encode_problem(p, tokenizer)[1]) for p in problems)
    generator = torch.Generator().manual_seed(seed) if do_sample else None
    for i in range(0, len(problems), batch_size):
        chunk = problems[i : i + batch_size]
        out = generate(model, tokenizer, [encode_problem(p, tokenizer)[0] for p in chunk],
                       max_new_tokens=longest + 16, do_sample=do_sample, temperature=1.0,
                       backtrack_bias=float("-inf"), generator=generator)
        texts += out.texts
        finished += out.finished.tolist()
        sequences += out.sequences
    return texts, finished, sequences


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


@torch.no_grad()
def planted(model, tokenizer, backtrack_id: int, problems, greedy: tuple[list, list, list]) -> dict[str, float]:
    """Backtrack probability right after a planted premature name (the retry data's error) and elsewhere, and right
    after the premature names of the policy's own ``greedy`` answers (:func:`answers`)."""
    examples = build_examples(problems, tokenizer, DepsErrors(kinds=["premature"], error_rate=1.0, seed=0))
    after, top, elsewhere = [], 0, []
    for example in examples:
        start = next((s for kind, s, _ in example.spans if kind == "backtrack"), None)
        if start is None:
            continue
        logits = model(torch.tensor([example.input_ids[:start]])).logits[0]  # [T, V], no backtrack in the prefix
        p = logits.softmax(-1)[:, backtrack_id]  # [T]
        after.append(p[-1].item())
        top += int(logits[-1].argmax().item() == backtrack_id)
        elsewhere.append(p[example.prompt_length : start - 1].mean().item())
    n = max(1, len(after))
    result = {"n": len(after), "p_backtrack_after": sum(after) / n, "backtrack_is_greedy": top / n,
              "p_backtrack_elsewhere": sum(elsewhere) / n}
    own, own_top = [], 0  # the policy's own premature steps, at the token that went wrong
    for problem, text, done, response in zip(problems, *greedy):
        if check_solution(problem.question, text, bool(done)).kind != "premature":
            continue
        wrong = first_wrong_token(tokenizer, problem.question, response)
        prompt = encode_problem(problem, tokenizer)[0]
        logits = model(torch.tensor([prompt + response[: wrong + 1]])).logits[0, -1]  # [V]
        own.append(logits.softmax(-1)[backtrack_id].item())
        own_top += int(logits.argmax().item() == backtrack_id)
    result.update(own_premature=len(own), p_backtrack_after_own=sum(own) / max(1, len(own)),
                  backtrack_is_greedy_own=own_top / max(1, len(own)))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a saved policy (full model or adapter), or tiny-deps")
    parser.add_argument("--task", default="deps")
    parser.add_argument("--num_problems", type=int, default=300)
    parser.add_argument("--samples", type=int, default=1, help="sampled answers per problem (0: greedy only)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--copy_detail", action="store_true", help="also count where the greedy copy mistakes fall")
    parser.add_argument("--planted", action="store_true", help="also measure backtracks after planted premature steps")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer, backtrack_id = load_policy(args.model)
    model.eval()
    problems = load_problems(args.task, args.split, args.num_problems)
    start = time.time()
    result = {"model": args.model, "task": args.task, "split": args.split}
    greedy = answers(model, tokenizer, problems, False, 0)
    texts, done, _ = greedy
    result["greedy"] = error_table([p.question for p in problems], texts, [p.answer for p in problems], done)
    if args.copy_detail:
        result["copy_detail"] = copy_detail([p.question for p in problems], texts, done)
    if args.samples:
        many = [p for p in problems for _ in range(args.samples)]
        texts, done, _ = answers(model, tokenizer, many, True, 0)
        result["sampled"] = error_table([p.question for p in many], texts, [p.answer for p in many], done)
    if args.planted:
        result["planted"] = planted(model, tokenizer, backtrack_id, problems, greedy)
    result["seconds"] = round(time.time() - start, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
