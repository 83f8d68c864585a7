"""Vocabulary classes of a tokenizer, decided once per token id: what random and plausible errors draw from.

Token classes (digit, operator, newline, special) are decided from each id's own text, once per tokenizer
(:func:`vocabulary_classes`); text is never decoded and re-encoded to find them.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass

from halluc_rl.backtrack import backtrack_token_id

OPERATORS: frozenset[str] = frozenset({"+", "-", "*", "/", "×", "÷"})


def special_ids(tokenizer) -> set[int]:
    """Ids of every special token (BOS/EOS/PAD/UNK, added special tokens, the backtrack token)."""
    ids = {int(i) for i in getattr(tokenizer, "all_special_ids", []) or []}
    ids |= {int(i) for i, tok in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items() if tok.special}
    try:
        ids.add(backtrack_token_id(tokenizer))
    except ValueError:
        pass
    return ids


def _shape(text: str) -> tuple[bool, bool]:
    return text[:1].isspace(), text[-1:].isspace()


@dataclass
class VocabularyClasses:
    """Single-token classes of a vocabulary: what random and plausible errors draw from."""

    normal_ids: list[int]
    """Every id that is not a special token."""
    digit_groups: dict[int, list[int]]
    """id -> the digit tokens of the same shape (spacing, number of digits), itself included."""
    operator_groups: dict[int, list[int]]
    """id -> the operator tokens of the same spacing, itself included."""
    newline_ids: frozenset[int]
    """Ids whose text holds a line break (steps of a solution end on them)."""


_CLASSES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def vocabulary_classes(tokenizer) -> VocabularyClasses:
    """Classify every vocabulary id once (cached per tokenizer object and size)."""
    cached = _CLASSES.get(tokenizer)
    if cached is not None and cached[0] == len(tokenizer):
        return cached[1]
    special = special_ids(tokenizer)
    normal = [i for i in range(len(tokenizer)) if i not in special]
    texts = tokenizer.batch_decode([[i] for i in normal])
    digits: dict[tuple, list[int]] = {}
    operators: dict[tuple, list[int]] = {}
    newlines = set()
    for i, text in zip(normal, texts):
        core = text.strip()
        if core and core.isascii() and core.isdigit():
            digits.setdefault((*_shape(text), len(core)), []).append(i)
        elif core in OPERATORS:
            operators.setdefault(_shape(text), []).append(i)
        if "\n" in text:
            newlines.add(i)
    classes = VocabularyClasses(
        normal_ids=normal,
        digit_groups={i: group for group in digits.values() if len(group) > 1 for i in group},
        operator_groups={i: group for group in operators.values() if len(group) > 1 for i in group},
        newline_ids=frozenset(newlines),
    )
    _CLASSES[tokenizer] = (len(tokenizer), classes)
    return classes


def until_special(tokens: Sequence[int], special: set[int]) -> list[int]:
    """``tokens`` cut before the first special token: an error never holds EOS (it would end generation)."""
    out = []
    for token in tokens:
        if token in special:
            break
        out.append(int(token))
    return out
