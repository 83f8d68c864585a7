"""Grading GSM8K-style answers: extract the final answer, normalise it to a number, compare numerically.

Three separate steps (as in nanochat), so each can be tested and reused on its own:

* :func:`extract_answer` finds the answer text: ``#### N`` first, then ``The answer is N``, else the last number;
* :func:`normalize_number` turns ``$1,000.`` or ``72.00 apples`` into a float;
* :func:`evaluate` / :func:`reward` compare a prediction with a gold answer (a full GSM8K solution or a bare number);
  :func:`majority_reward` grades the majority vote of several predictions (maj@k).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_UNSIGNED = r"(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
NUMBER = r"(?:(?<![\w.])-)?" + _UNSIGNED
"""A number as written in text: optional sign (not after a word, so ``5-3`` has no ``-3``), thousands commas, decimals."""

_NUMBER_RE = re.compile(NUMBER)
_HASH_RE = re.compile(r"####\s*\$?\s*(-?" + _UNSIGNED + ")")
_ANSWER_IS_RE = re.compile(r"the\s+(?:final\s+)?answer\s+is\s*:?\s*\$?\s*(" + NUMBER + ")", re.IGNORECASE)
_PLAIN_NUMBER_RE = re.compile(r"-?(?:\d+(?:\.\d+)?|\.\d+)")


def extract_hash_answer(text: str) -> str | None:
    """The number after GSM8K's ``####`` marker (e.g. ``"1,000"``), or None when there is none."""
    match = _HASH_RE.search(text)
    return match.group(1) if match else None


def extract_answer(text: str) -> str | None:
    """The answer part of ``text`` as written (e.g. ``"1,000"``), or None when the text holds no number.

    Order: the first ``#### N`` (GSM8K's final line), then the last ``The answer is N``, else the last number.
    """
    marked = extract_hash_answer(text)
    if marked is not None:
        return marked
    said = _ANSWER_IS_RE.findall(text)
    if said:
        return said[-1]
    numbers = _NUMBER_RE.findall(text)
    return numbers[-1] if numbers else None


def normalize_number(s: str | None) -> float | None:
    """``s`` as a float, ignoring ``$``, thousands commas, units or words after it and a trailing period.

    ``"72.00"``, ``"72"`` and ``"72 apples."`` give 72.0; ``"$1,000."`` gives 1000.0; None when there is no number.
    """
    if s is None:
        return None
    cleaned = s.replace(",", "").replace("$", "").strip()
    match = _PLAIN_NUMBER_RE.search(cleaned)
    return float(match.group(0)) if match else None


def _same_number(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(1.0, abs(b))


def evaluate(prediction_text: str, gold: str) -> bool:
    """Whether the answer extracted from ``prediction_text`` equals ``gold`` as a number.

    ``gold`` may be a whole GSM8K solution (graded by its ``#### N``) or a bare number such as ``"1,000"``.
    """
    gold_value = normalize_number(extract_answer(gold))
    if gold_value is None:
        raise ValueError(f"the gold answer {gold!r} holds no number")
    predicted = normalize_number(extract_answer(prediction_text))
    return predicted is not None and _same_number(predicted, gold_value)


def reward(prediction_text: str, gold: str) -> float:
    """1.0 when :func:`evaluate` says the prediction is correct, else 0.0 (the outcome reward)."""
    return 1.0 if evaluate(prediction_text, gold) else 0.0


def majority_answer(texts: Sequence[str]) -> float | None:
    """The answer most of ``texts`` give, as a number (self-consistency's vote, Wang et al. 2023): texts without a
    number do not vote; a tie goes to the answer reached first. None when no text holds a number."""
    votes: dict[float, int] = {}
    for text in texts:
        value = normalize_number(extract_answer(text))
        if value is not None:
            votes[value] = votes.get(value, 0) + 1
    return max(votes, key=votes.__getitem__) if votes else None  # max keeps the first of equal counts


def majority_reward(texts: Sequence[str], gold: str) -> float:
    """1.0 when the :func:`majority_answer` of ``texts`` equals ``gold`` as a number (maj@k), else 0.0."""
    gold_value = normalize_number(extract_answer(gold))
    if gold_value is None:
        raise ValueError(f"the gold answer {gold!r} holds no number")
    voted = majority_answer(texts)
    return 1.0 if voted is not None and _same_number(voted, gold_value) else 0.0
