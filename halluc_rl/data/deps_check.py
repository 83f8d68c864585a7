"""The ``deps`` oracle: is a (partial) solution still right, and if not, where and how did it go wrong?

It reads only the question (:func:`~halluc_rl.data.deps.parse_question`), never the reference, so every order in
which each line comes after its inputs is right. A line is right when it is, character for character, the line of a
variable that is needed and ready (its inputs computed, itself not yet); after the target the only right line is
``#### N``. The first wrong character gets a kind (:data:`ERROR_KINDS`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from halluc_rl.data.deps import DepsQuestion, parse_question

ERROR_KINDS: tuple[str, ...] = ("premature", "unneeded", "repeat", "copy", "slip", "incomplete", "malformed")
"""``premature``: a needed variable whose inputs are not all computed yet (wrong from the character naming it);
``unneeded``: a variable the answer does not need; ``repeat``: a variable computed already; ``copy``: the
right-hand side is not the variable's definition (a lookup mistake); ``slip``: a wrong value (a substituted input,
a result or the final answer); ``incomplete``: ``####`` or the end before the target is computed, or a variable's
line that stops before its result; ``malformed``:
anything else (not a variable, broken separators, text after the answer)."""
ORDER_KINDS: frozenset[str] = frozenset({"premature", "unneeded", "repeat"})
"""The kinds that are mistakes of *which* step comes next, not of how a step is written."""


@dataclass(frozen=True)
class DepsVerdict:
    """The oracle's judgement of a text: on track, or the first wrong line, its first wrong character, its kind."""

    on_track: bool
    step: int | None = None
    char: int | None = None
    kind: str | None = None


def _candidates(question: DepsQuestion, needed: frozenset[str], values: dict[str, int]) -> dict[str, str]:
    """The right next lines, keyed by their first character."""
    ready = [n for n in question.order if n in needed and n not in values
             and all(i in values for i in question.inputs(n))]
    if not ready:
        return {"#": f"#### {values[question.target]}"}
    return {name: question.line(name, values) for name in ready}


def _kind(question: DepsQuestion, needed: frozenset[str], values: dict[str, int], line: str, expected: str | None,
          c: int) -> str:
    """The kind of the mistake at character ``c`` of ``line`` (``expected``: the right line it started as)."""
    if expected is None:  # the first character is already wrong
        name = line[0]
        if name in question.definitions:
            if name in values:
                return "repeat"
            return "premature" if name in needed else "unneeded"
        return "incomplete" if name == "#" and question.target not in values else "malformed"
    if expected.startswith("#"):
        return "slip" if c >= len("#### ") and c < len(line) and line[c].isdigit() else "malformed"
    head = len(f"{line[0]} = {question.definitions[line[0]]}")
    if c < len(f"{line[0]} = "):
        return "malformed"
    if c < head:
        return "copy"
    if c < len(line) and line[c].isdigit():
        return "slip" if len(expected) > head else "copy"
    return "malformed"


def _check_line(question: DepsQuestion, needed: frozenset[str], values: dict[str, int], line: str,
                finished: bool) -> tuple[int, str] | None:
    """None when ``line`` is right so far (whole, if ``finished``), else (first wrong character, kind)."""
    options = _candidates(question, needed, values)
    expected = options.get(line[:1]) if line else None
    if expected is not None and (expected == line or (not finished and expected.startswith(line))):
        return None
    if not line:
        return None if not finished else (0, "incomplete" if "#" not in options else "malformed")
    if expected is None:
        return 0, _kind(question, needed, values, line, None, 0)
    c = next((k for k, (a, b) in enumerate(zip(line, expected)) if a != b), min(len(line), len(expected)))
    if c == len(line) and finished:  # the line stopped before its end
        return c, "malformed" if expected.startswith("#") else "incomplete"
    return c, _kind(question, needed, values, line, expected, c)


def check_solution(question: str | DepsQuestion, text: str, ended: bool = False) -> DepsVerdict:
    """Judge ``text``, a solution so far (leading whitespace ignored): on track, or its first mistake.

    ``ended``: the text is the whole answer (it must then end with the right ``#### N`` line). ``char`` counts in
    ``text`` itself, leading whitespace included.
    """
    parsed = parse_question(question) if isinstance(question, str) else question
    if parsed is None:
        raise ValueError(f"not a deps question: {question!r}")
    needed = parsed.needed()
    offset = len(text) - len(text.lstrip())
    lines = text[offset:].split("\n")
    values: dict[str, int] = {}
    start, done = offset, False
    for k, line in enumerate(lines):
        finished = k < len(lines) - 1 or ended
        if done:  # a line break after the answer line: nothing may follow it
            return DepsVerdict(False, k, start - 1, "malformed")
        wrong = _check_line(parsed, needed, values, line, finished)
        if wrong is not None:
            return DepsVerdict(False, k, start + wrong[0], wrong[1])
        if finished and line.startswith("#"):
            done = True
        elif finished:
            values[line[0]] = parsed.value(parsed.definitions[line[0]], values)
        start += len(line) + 1
    if ended and not done:  # every line right, but the answer line never came
        return DepsVerdict(False, len(lines), len(text), "incomplete")
    return DepsVerdict(True)


def solution_on_track(question: str, text: str, ended: bool = False) -> bool:
    """Whether ``text`` is still a right solution of ``question`` (a whole one, once ``ended``)."""
    return check_solution(question, text, ended).on_track


def first_wrong_token(tokenizer, question: str, response_ids: Sequence[int]) -> int | None:
    """Index of the first token of ``response_ids`` after which the visible text is off track (None: none is).

    The response ended when its last token is special (EOS); special tokens decode to nothing.
    """
    special = set(tokenizer.all_special_ids)
    ids = list(response_ids)
    for t in range(len(ids)):
        ended = ids[t] in special
        text = tokenizer.decode(ids[: t + 1], skip_special_tokens=True)
        if not check_solution(question, text, ended).on_track:
            return t
        if ended:
            return None
    return None


def error_table(questions: Sequence[str], texts: Sequence[str], answers: Sequence[str],
                ended: Sequence[bool] | None = None) -> dict:
    """Strict accuracy (the checker accepts the whole answer), answer accuracy (the ``#### N`` line holds the gold
    ``answers[i]``), and the kind of the first mistake of each strictly wrong answer (``kinds``: counts, every kind
    of :data:`ERROR_KINDS` present; ``order_share``: the share of wrong answers whose first mistake is one of
    :data:`ORDER_KINDS`)."""
    ended = [True] * len(texts) if ended is None else list(ended)
    kinds = dict.fromkeys(ERROR_KINDS, 0)
    strict = right = 0
    for question, text, answer, done in zip(questions, texts, answers, ended):
        verdict = check_solution(question, text, done)
        strict += verdict.on_track
        right += text.strip().rpartition("#### ")[2].strip() == answer
        if not verdict.on_track:
            kinds[verdict.kind] += 1
    wrong = len(texts) - strict
    return {"n": len(texts), "strict": strict / max(1, len(texts)), "answer": right / max(1, len(texts)),
            "kinds": kinds, "order_share": sum(kinds[k] for k in ORDER_KINDS) / wrong if wrong else None}
