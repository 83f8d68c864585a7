"""Losses and the action distributions they imply: one home for the maths trainers and generation share.

Two readings of the backtrack logit ``z`` (the ``backtrack_head`` of a policy):

* ``softmax`` (the default): ``<|BACKTRACK|>`` is one more token of the vocabulary softmax, trained with the usual
  next-token cross-entropy.
* ``factorized``: a separate "delete?" decision. P(backtrack | s) = sigmoid(z) and
  P(token | s) = (1 - sigmoid(z)) * softmax(other logits). It is trained with binary cross-entropy on ``z`` at every
  labelled state, and next-token cross-entropy over the other logits only where the label is a token. A backtrack
  label then never pushes the vocabulary's logits down, which on the embedded tiny model removes the loss of
  confidence that softmax training causes on clean text (measured in docs/demo.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BACKTRACK_HEADS: tuple[str, ...] = ("softmax", "factorized")
IGNORE_INDEX = -100


def check_head(head: str) -> str:
    if head not in BACKTRACK_HEADS:
        raise ValueError(f"backtrack_head must be one of {BACKTRACK_HEADS}, got {head!r}")
    return head


def factorized_log_probs(logits: torch.Tensor, backtrack_id: int) -> torch.Tensor:
    """Log-probabilities [..., V] of the factorised action distribution from raw logits [..., V].

    log P(bt) = logsigmoid(z); log P(tok) = logsigmoid(-z) + log_softmax(others)(tok).
    """
    logits = logits.float()
    z = logits[..., backtrack_id]  # [...]
    others = logits.clone()
    others[..., backtrack_id] = float("-inf")
    out = torch.log_softmax(others, dim=-1) + F.logsigmoid(-z).unsqueeze(-1)  # [..., V]
    out[..., backtrack_id] = F.logsigmoid(z)
    return out


def action_log_probs(logits: torch.Tensor, backtrack_id: int, head: str = "softmax") -> torch.Tensor:
    """Log-probabilities [..., V] of every action under ``head`` (what generation samples from)."""
    if check_head(head) == "factorized":
        return factorized_log_probs(logits, backtrack_id)
    return torch.log_softmax(logits.float(), dim=-1)


def factorized_backtrack_loss(logits: torch.Tensor, labels: torch.Tensor, backtrack_id: int,
                              num_items: int | torch.Tensor | None = None) -> torch.Tensor:
    """Summed BCE on the backtrack logit plus token cross-entropy, divided by the number of labels.

    ``logits`` [B, L, V] and ``labels`` [B, L] are in the Hugging Face layout (``labels[:, i + 1]`` is the target of
    ``logits[:, i]``; ``-100`` is ignored). ``num_items`` overrides the divisor (gradient accumulation).
    """
    logits = logits[:, :-1].float()  # [B, L-1, V]
    labels = labels[:, 1:]  # [B, L-1]
    valid = labels != IGNORE_INDEX
    is_bt = (labels == backtrack_id) & valid
    bce = F.binary_cross_entropy_with_logits(logits[..., backtrack_id][valid], is_bt[valid].float(), reduction="sum")
    tokens = valid & ~is_bt
    others = logits[tokens]  # [N, V]
    others[:, backtrack_id] = float("-inf")
    ce = F.cross_entropy(others, labels[tokens], reduction="sum")
    divisor = valid.sum() if num_items is None else num_items
    return (bce + ce) / torch.as_tensor(divisor, device=bce.device).clamp(min=1)
