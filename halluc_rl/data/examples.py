"""Backtrack training examples: the spans of an example and how one is assembled from planned errors.

An example is ``prompt`` then the response's action stream: reference tokens, and at chosen reference positions an
``error`` (wrong tokens), one ``backtrack`` per error token, then the reference goes on from where the error was
typed (the ``correction``). Applying the actions (:func:`halluc_rl.backtrack.apply_actions`) always gives back the
reference response exactly. The error sources that plan the errors are in :mod:`halluc_rl.data.errors`; the
collator reads the spans (:func:`spans_labels_mask`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from halluc_rl.backtrack import apply_actions

SPAN_KINDS: tuple[str, ...] = ("prompt", "correct", "error", "reveal", "backtrack", "correction")
"""``correct``: reference tokens before the first error; ``reveal``: tokens typed after an error that are right
given it and expose it (a check computed from a wrong result), deleted with it, and training targets (in the rewind
layout their states are trained to backtrack instead, see :class:`PlausibleErrors`); ``correction``: reference
tokens after a group of backtracks."""

Span = tuple[str, int, int]
ErrorPlan = tuple[int, list[int]] | tuple[int, list[int], int]
"""(position in the reference response, the tokens typed there instead of ``response[position]``[, how many of
those tokens, at the end, are ``reveal`` tokens (default 0)])."""


def normalize_spans(spans: Iterable) -> list[Span]:
    """Spans as ``(kind, start, end)`` tuples, from tuples/lists or from dicts ``{"kind", "start", "end"}``."""
    out = []
    for span in spans:
        kind, start, end = (span["kind"], span["start"], span["end"]) if isinstance(span, dict) else span
        if kind not in SPAN_KINDS:
            raise ValueError(f"unknown span kind {kind!r}; expected one of {SPAN_KINDS}")
        out.append((str(kind), int(start), int(end)))
    return out


def spans_labels_mask(length: int, spans: Iterable, train_errors: bool = False) -> list[bool]:
    """Which tokens are training targets: everything but the prompt and (unless ``train_errors``) the errors."""
    mask = [False] * length
    for kind, start, end in normalize_spans(spans):
        trained = kind in ("correct", "reveal", "backtrack", "correction") or (kind == "error" and train_errors)
        mask[start:end] = [trained] * (end - start)
    return mask


@dataclass
class BacktrackExample:
    """One training sequence and the exact token spans of its parts."""

    input_ids: list[int]
    spans: list[Span]
    backtrack_id: int

    @property
    def prompt_length(self) -> int:
        return sum(end - start for kind, start, end in self.spans if kind == "prompt")

    @property
    def num_errors(self) -> int:
        """How many errors (each with its own group of backtracks) the example holds."""
        return sum(kind == "error" for kind, _, _ in self.spans)

    def labels_mask(self, train_errors: bool = False) -> list[bool]:
        """Per-token training targets (see :func:`spans_labels_mask`)."""
        return spans_labels_mask(len(self.input_ids), self.spans, train_errors)

    def visible_response(self) -> list[int]:
        """The response left after applying every backtrack: the reference response."""
        return apply_actions(self.input_ids[self.prompt_length :], self.backtrack_id).visible_ids

    def to_features(self) -> dict:
        """``{"input_ids", "spans"}`` for :class:`~halluc_rl.data.collator.MaskedErrorCollator`; spans as dicts, so a
        ``datasets.Dataset`` can store them."""
        spans = [{"kind": kind, "start": start, "end": end} for kind, start, end in self.spans]
        return {"input_ids": list(self.input_ids), "spans": spans}


def assemble_example(
    prompt_ids: Sequence[int], response_ids: Sequence[int], errors: Sequence[ErrorPlan], backtrack_id: int
) -> BacktrackExample:
    """The example that types each planned error at its position, deletes it, and continues the reference.

    ``errors`` are ``(position, tokens[, reveal])`` with strictly increasing positions inside the response; an
    error's first token differs from the reference token it stands in for, and no error holds the backtrack token.
    The last ``reveal`` tokens (fewer than all) are a ``reveal`` span, the others an ``error`` span.
    """
    response = list(response_ids)
    ids: list[int] = list(prompt_ids)
    spans: list[Span] = [("prompt", 0, len(ids))] if ids else []

    def add(kind: str, tokens: Sequence[int]) -> None:
        if tokens:
            spans.append((kind, len(ids), len(ids) + len(tokens)))
            ids.extend(tokens)

    cursor, kind = 0, "correct"
    for position, tokens, *rest in errors:
        reveal = int(rest[0]) if rest else 0
        if not cursor <= position < len(response) or (position == cursor and kind == "correction"):
            raise ValueError(f"error positions must increase strictly inside the response; got {position}")
        if not tokens or tokens[0] == response[position] or backtrack_id in tokens or not 0 <= reveal < len(tokens):
            raise ValueError(f"invalid error tokens {list(tokens)} (reveal {reveal}) at position {position}")
        add(kind, response[cursor:position])
        add("error", tokens[: len(tokens) - reveal])
        add("reveal", tokens[len(tokens) - reveal :])
        add("backtrack", [backtrack_id] * len(tokens))
        cursor, kind = position, "correction"
    add(kind, response[cursor:])
    return BacktrackExample(ids, spans, backtrack_id)
