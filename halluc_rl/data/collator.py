"""Batching backtrack examples for training: labels that skip the errors, laid out the way generation sees them.

Two layouts:

* ``layout="rewind"`` (default) matches backtrack-aware generation exactly. Generation rewinds the KV cache on every
  backspace, so each action is chosen from the visible text alone. The example's action stream is replayed with the
  backtrack stack (:func:`halluc_rl.backtrack.rewind_layout`): typed tokens are packed into one sequence, each
  attending only to the visible tokens before it (a 4D mask) at its visible position (``position_ids``), and each
  trained action - a correct token, a backtrack, a correction - is the label of the state it was taken from.
  Backtrack tokens are never inputs. The logits every label is trained on equal a fresh forward over that visible
  state (tested), so what SFT teaches is what generation does.
* ``layout="retry"`` keeps the stream as one causal sequence with the backtrack tokens in context (the in-context
  "retry" recipe); the options below move it part of the way towards the rewind semantics.

Label rule: the loss is on ``correct``, ``backtrack`` and ``correction`` tokens; never on the prompt or padding, and on
``error`` tokens only for the ``train_errors`` ablation (which teaches the model to make the errors too).

``hard_attention`` and ``rewind_positions`` make training look like backtrack-aware generation, where a deleted token
is cut out of the KV cache and the text goes on from the shortened prefix:

* attention (``hard_attention``): plain causal, except that once a group (an error and its backtracks) is complete,
  no later token attends to it. Backtrack tokens *do* attend to the errors they delete (and to earlier backtracks of
  their group): seeing the error is how the model learns when to delete. Corrections and everything after them see
  the prompt and the visible response only, as in generation.
* positions (``rewind_positions``): every token sits at the number of visible tokens before it is typed. Prompt,
  correct and correction tokens get their index in the visible text; error tokens continue from the prefix
  (``p, p+1, ..., p+n-1`` for an error of ``n`` tokens after a visible prefix of ``p``); the backtracks then count
  down (``p+n, p+n-1, ..., p+1``) as each removes one token; the correction restarts at ``p``, exactly where the
  error was typed, as if it never had been. Padding continues after the last real position.

With both options on, the logits of every correction token equal those of the clean sequence (prompt + reference).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from halluc_rl.data.examples import Span, normalize_spans, spans_labels_mask

IGNORE_INDEX = -100


def _clip_spans(spans: list[Span], length: int) -> list[Span]:
    """Spans cut to the first ``length`` tokens (empty ones dropped)."""
    return [(kind, start, min(end, length)) for kind, start, end in spans if start < length]


def rewound_positions(spans: Sequence[Span], length: int) -> list[int]:
    """Position of each token: the count of visible tokens before it (see the module docstring)."""
    positions = list(range(length))
    visible = 0
    for kind, start, end in spans:
        for i in range(start, end):
            if kind == "backtrack":
                positions[i] = visible
                visible -= 1
            else:
                positions[i] = visible
                visible += 1
    return positions


def deleted_from(spans: Sequence[Span], length: int) -> list[int]:
    """For each token, the first index that may no longer attend to it: the end of its error group (error, reveal,
    backtracks) for the tokens of that group, ``length`` (never) for everything else."""
    until = [length] * length
    group: list[tuple[int, int]] = []
    for kind, start, end in spans:
        if kind == "error":
            group = [(start, end)]
        elif kind == "reveal":
            group.append((start, end))
        elif kind == "backtrack":
            group.append((start, end))
            group_end = end
            for g_start, g_end in group:
                until[g_start:g_end] = [group_end] * (g_end - g_start)
            group = []
    return until


def hard_attention_mask(until: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Boolean [B, 1, L, L] mask (True = may attend) from ``until`` [B, L] (see :func:`deleted_from`) and ``real``
    [B, L] (False on padding). Causal, deleted groups hidden from later tokens, padding hidden; every token sees
    itself so that no row is empty."""
    length = until.shape[1]
    idx = torch.arange(length, device=until.device)  # [L]
    causal = idx.view(1, length, 1) >= idx.view(1, 1, length)  # [1, L(q), L(k)]
    alive = idx.view(1, length, 1) < until.unsqueeze(1)  # [B, L(q), L(k)]: query comes before the key's deletion
    allowed = causal & alive & real.unsqueeze(1)  # [B, L, L]
    allowed |= torch.eye(length, dtype=torch.bool, device=until.device).unsqueeze(0)  # [B, L, L]
    return allowed.unsqueeze(1)  # [B, 1, L, L]


@dataclass
class MaskedErrorCollator:
    """Pads backtrack examples (right padding) into ``input_ids``, ``attention_mask``, ``labels`` [B, L] tensors.

    Each feature is a mapping with ``input_ids`` and ``spans`` (``(kind, start, end)`` tuples or dicts, as
    :meth:`BacktrackExample.to_features` gives), or with a precomputed ``labels_mask`` (True = trained; then
    ``train_errors`` does not apply and neither option below can be used). Usable as ``data_collator`` of
    ``transformers.Trainer`` and TRL's ``SFTTrainer`` (set ``remove_unused_columns=False`` so ``spans`` reaches it,
    and ``dataset_kwargs={"skip_prepare_dataset": True}`` for SFTTrainer), or with a plain ``DataLoader``.

    ``backtrack_token_id`` is the policy's (``model.config.backtrack_token_id``); the rewind layout needs it once
    an example holds a backtrack. ``hard_attention`` replaces ``attention_mask`` with a 4D [B, 1, L, L] mask: additive (0 / dtype minimum) in
    ``mask_dtype``, which works with eager and SDPA attention; ``mask_dtype=torch.bool`` gives a boolean mask
    (True = attend) for SDPA. Use the model's dtype under half precision. ``rewind_positions`` adds
    ``position_ids`` [B, L]. ``max_length`` truncates on the right; ``pad_to_multiple_of`` rounds L up.
    """

    pad_token_id: int = 0
    backtrack_token_id: int | None = None
    train_errors: bool = False
    layout: str = "rewind"
    hard_attention: bool = False
    rewind_positions: bool = False
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
            if self.hard_attention or self.rewind_positions:
                raise ValueError("hard_attention and rewind_positions need 'spans' in each feature, not 'labels_mask'")
            mask = [bool(m) for m in feature["labels_mask"]]
        else:
            raise ValueError("each feature needs 'spans' (or a precomputed 'labels_mask') besides 'input_ids'")
        if len(mask) != len(ids):
            raise ValueError(f"labels_mask has {len(mask)} entries for {len(ids)} tokens")
        return ids[:length], mask[:length], spans

    def _width(self, longest: int) -> int:
        multiple = self.pad_to_multiple_of
        return longest if not multiple else -(-longest // multiple) * multiple

    def __post_init__(self) -> None:
        if self.layout not in ("rewind", "retry"):
            raise ValueError(f"layout must be 'rewind' or 'retry', got {self.layout!r}")
        if self.layout == "rewind" and self.train_errors:
            raise ValueError(
                "train_errors has no effect in the rewind layout: every state an error is typed from is left again "
                "later, by a backtrack or the correction, and that later action is its label. For the unmasked "
                "ablation use layout='retry' with train_errors=True."
            )

    def _rewind(self, features: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        """The ``rewind`` layout: the scorer's packing (:func:`halluc_rl.scoring.pack_streams`), with labels."""
        from halluc_rl.scoring import pack_streams

        streams, prompts, masks = [], [], []
        for feature in features:
            ids, mask, spans = self._prepare(feature)
            if spans is None:
                raise ValueError("layout='rewind' needs 'spans' in each feature (or use layout='retry')")
            if self.backtrack_token_id is None and any(kind == "backtrack" for kind, _, _ in spans):
                raise ValueError("the examples hold backtracks: give the collator backtrack_token_id "
                                 "(model.config.backtrack_token_id)")
            streams.append(ids)
            prompts.append(sum(end - start for kind, start, end in spans if kind == "prompt"))
            masks.append(mask)
        bt = -1 if self.backtrack_token_id is None else self.backtrack_token_id
        packed = pack_streams(streams, prompts, bt, masks, pad_id=self.pad_token_id,
                              pad_to_multiple_of=self.pad_to_multiple_of, mask_dtype=self.mask_dtype)
        return {"input_ids": packed.input_ids, "labels": packed.labels, "position_ids": packed.position_ids,
                "attention_mask": packed.attention_mask}

    def _mask_tensor(self, allowed: torch.Tensor) -> torch.Tensor:
        if self.mask_dtype == torch.bool:
            return allowed
        blocked = torch.finfo(self.mask_dtype).min
        return torch.zeros(allowed.shape, dtype=self.mask_dtype).masked_fill(~allowed, blocked)

    def __call__(self, features: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        if self.layout == "rewind":
            return self._rewind(features)
        prepared = [self._prepare(f) for f in features]
        batch, width = len(prepared), self._width(max(len(ids) for ids, _, _ in prepared))
        input_ids = torch.full((batch, width), self.pad_token_id, dtype=torch.long)  # [B, L]
        labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)  # [B, L]
        real = torch.zeros((batch, width), dtype=torch.bool)  # [B, L]
        positions = torch.zeros((batch, width), dtype=torch.long)  # [B, L]
        until = torch.full((batch, width), width, dtype=torch.long)  # [B, L]
        for b, (ids, mask, spans) in enumerate(prepared):
            n = len(ids)
            input_ids[b, :n] = torch.tensor(ids, dtype=torch.long)
            real[b, :n] = True
            trained = torch.tensor(mask, dtype=torch.bool)  # [n]
            labels[b, :n] = torch.where(trained, input_ids[b, :n], IGNORE_INDEX)
            if self.rewind_positions:
                pos = rewound_positions(spans, n)
                positions[b, :n] = torch.tensor(pos, dtype=torch.long)
                start = (pos[-1] + 1) if pos else 0
                positions[b, n:] = torch.arange(start, start + width - n)  # padding continues after the last token
            if self.hard_attention:
                until[b, :n] = torch.tensor(deleted_from(spans, n), dtype=torch.long)
        out = {"input_ids": input_ids, "attention_mask": real.long(), "labels": labels}
        if self.hard_attention:
            out["attention_mask"] = self._mask_tensor(hard_attention_mask(until, real))  # [B, 1, L, L]
        if self.rewind_positions:
            out["position_ids"] = positions
        return out
