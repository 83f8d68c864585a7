"""Batching backtrack examples for training: labels that skip the errors, laid out the way generation sees them.

One layout per backtrack semantics (:data:`halluc_rl.backtrack.SEMANTICS`), each the scorer's own packing
(:func:`halluc_rl.scoring.pack_streams`), so every action is trained on exactly the context generation gives it:

* ``layout="rewind"`` (default). Generation rewinds the KV cache on every backspace, so each action is chosen from
  the visible text alone. The example's action stream is replayed with the backtrack stack
  (:func:`halluc_rl.backtrack.rewind_layout`): typed tokens are packed into one sequence, each attending only to the
  visible tokens before it (a 4D mask) at its visible position (``position_ids``), and each trained action - a
  correct token, a backtrack, a correction - is the label of the state it was taken from. Backtrack tokens are
  never inputs.
* ``layout="retry"``. Generation feeds every action, so the stream is one causal sequence with the error and
  backtrack tokens in context (:func:`halluc_rl.backtrack.retry_layout`): the correction follows the error it
  replaces, as in Physics of Language Models 2.2's retry data.

The logits every label is trained on equal a fresh forward over that context (tested, both layouts).

Label rule: the loss is on ``correct``, ``backtrack`` and ``correction`` tokens; never on the prompt or padding, and on
``error`` tokens only with ``train_errors`` (``retry`` only: it teaches the model to make the errors too).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from halluc_rl.backtrack import check_semantics
from halluc_rl.data.examples import Span, normalize_spans, spans_labels_mask

IGNORE_INDEX = -100


def _clip_spans(spans: list[Span], length: int) -> list[Span]:
    """Spans cut to the first ``length`` tokens (empty ones dropped)."""
    return [(kind, start, min(end, length)) for kind, start, end in spans if start < length]


@dataclass
class MaskedErrorCollator:
    """Pads backtrack examples (right padding) into ``input_ids``, ``attention_mask``, ``labels`` [B, L] tensors.

    Each feature is a mapping with ``input_ids`` and ``spans`` (``(kind, start, end)`` tuples or dicts, as
    :meth:`BacktrackExample.to_features` gives), or, in the retry layout, with a precomputed ``labels_mask``
    (True = trained; then ``train_errors`` does not apply). Usable as ``data_collator`` of
    ``transformers.Trainer`` and TRL's ``SFTTrainer`` (set ``remove_unused_columns=False`` so ``spans`` reaches it,
    and ``dataset_kwargs={"skip_prepare_dataset": True}`` for SFTTrainer), or with a plain ``DataLoader``.

    ``backtrack_token_id`` is the policy's (``model.config.backtrack_token_id``); the rewind layout needs it once
    an example holds a backtrack. ``mask_dtype`` is the dtype of the rewind layout's 4D [B, 1, L, L] mask:
    additive (0 / dtype minimum), which works with eager and SDPA attention; ``torch.bool`` gives True = attend.
    Use the model's dtype under half precision. ``max_length`` truncates on the right; ``pad_to_multiple_of``
    rounds L up. The retry layout gives a 2D ``attention_mask`` (1 = a real token).
    """

    pad_token_id: int = 0
    backtrack_token_id: int | None = None
    train_errors: bool = False
    layout: str = "rewind"
    max_length: int | None = None
    pad_to_multiple_of: int | None = None
    mask_dtype: torch.dtype = torch.float32

    def _prepare(self, feature: Mapping) -> tuple[list[int], list[bool], list[Span] | None]:
        """One feature's ids, label mask and spans, truncated to ``max_length``."""
        raw = feature["input_ids"]
        ids = [int(t) for t in (raw.tolist() if isinstance(raw, torch.Tensor) else raw)]
        length = len(ids) if self.max_length is None else min(len(ids), self.max_length)
        spans = normalize_spans(feature["spans"]) if feature.get("spans") is not None else None
        if spans is not None:
            if spans and (spans[0][1] != 0 or spans[-1][2] != len(ids)):
                raise ValueError(f"spans must cover all {len(ids)} tokens; got {spans}")
            mask = spans_labels_mask(len(ids), spans, self.train_errors)
            spans = _clip_spans(spans, length)
        elif feature.get("labels_mask") is not None:
            mask = [bool(m) for m in feature["labels_mask"]]
        else:
            raise ValueError("each feature needs 'spans' (or a precomputed 'labels_mask') besides 'input_ids'")
        if len(mask) != len(ids):
            raise ValueError(f"labels_mask has {len(mask)} entries for {len(ids)} tokens")
        return ids[:length], mask[:length], spans

    def __post_init__(self) -> None:
        check_semantics(self.layout)
        if self.layout == "rewind" and self.train_errors:
            raise ValueError(
                "train_errors has no effect in the rewind layout: every state an error is typed from is left again "
                "later, by a backtrack or the correction, and that later action is its label. For the unmasked "
                "ablation use layout='retry' with train_errors=True."
            )

    def __call__(self, features: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        from halluc_rl.scoring import pack_streams

        streams, prompts, masks = [], [], []
        for feature in features:
            ids, mask, spans = self._prepare(feature)
            if spans is None and self.layout == "rewind":
                raise ValueError("layout='rewind' needs 'spans' in each feature (or use layout='retry')")
            holds_backtracks = any(kind == "backtrack" for kind, _, _ in spans or ())
            if self.layout == "rewind" and self.backtrack_token_id is None and holds_backtracks:
                raise ValueError("the examples hold backtracks: give the collator backtrack_token_id "
                                 "(model.config.backtrack_token_id)")
            streams.append(ids)
            prompts.append(sum(end - start for kind, start, end in spans if kind == "prompt") if spans else 1)
            masks.append(mask)
        bt = -1 if self.backtrack_token_id is None else self.backtrack_token_id
        packed = pack_streams(streams, prompts, bt, masks, pad_id=self.pad_token_id,
                              pad_to_multiple_of=self.pad_to_multiple_of, mask_dtype=self.mask_dtype,
                              semantics=self.layout)
        out = {"input_ids": packed.input_ids, "labels": packed.labels, "attention_mask": packed.attention_mask}
        if self.layout == "rewind":
            out["position_ids"] = packed.position_ids
        return out
