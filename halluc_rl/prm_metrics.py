"""The one yardstick every process reward model (PRM) is measured with, ProcessBench style.

Zheng et al. 2024, "ProcessBench: Identifying Process Errors in Mathematical Reasoning": :func:`roc_auc` over
steps, and :func:`first_error_f1` over samples (:func:`evaluate_step_scores` gives both), against per-step 0/1
labels (:mod:`halluc_rl.labels`). :func:`prm_step_scores` and :func:`implicit_step_scores` turn a PRM into
per-step scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def roc_auc(scores: Sequence[float], labels: Sequence[int]) -> float | None:
    """Area under the ROC curve of ``scores`` for ``labels`` (1 = a right step): the probability that a right step
    outscores a wrong one, ties counting half (the Mann-Whitney U statistic over average ranks). None when one
    class is missing."""
    x = torch.as_tensor(list(scores), dtype=torch.float64)  # [N]
    y = torch.as_tensor(list(labels), dtype=torch.bool)  # [N]
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        return None
    order = torch.argsort(x)
    sorted_x = x[order]
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(1, len(x) + 1, dtype=torch.float64)
    _, inverse, counts = torch.unique_consecutive(sorted_x, return_inverse=True, return_counts=True)
    first = torch.cumsum(counts, 0) - counts + 1  # [G] rank of each tie group's first member
    average = (first + (counts - 1) / 2.0).to(torch.float64)  # [G] the group's average rank
    ranks[order] = average[inverse]
    return float((ranks[y].sum() - pos * (pos + 1) / 2) / (pos * neg))


def first_error(scores: Sequence[float], threshold: float) -> int:
    """Index of the first step scored below ``threshold`` (-1: none). With 0/1 labels and threshold 0.5, the
    true first error."""
    return next((i for i, s in enumerate(scores) if s < threshold), -1)


def first_error_f1(scores: Sequence[Sequence[float]], labels: Sequence[Sequence[int]],
                   threshold: float) -> dict[str, float | None]:
    """ProcessBench's F1: per sample the predicted first error (:func:`first_error`) against the true one; the
    harmonic mean of the accuracy on samples with an error (the exact step) and on samples without one."""
    hit_err = n_err = hit_ok = n_ok = 0
    for s, y in zip(scores, labels):
        true, pred = first_error(y, 0.5), first_error(s, threshold)
        if true >= 0:
            n_err, hit_err = n_err + 1, hit_err + int(pred == true)
        else:
            n_ok, hit_ok = n_ok + 1, hit_ok + int(pred == -1)
    acc_err = hit_err / n_err if n_err else None
    acc_ok = hit_ok / n_ok if n_ok else None
    f1 = None if acc_err is None or acc_ok is None else (
        0.0 if acc_err + acc_ok == 0 else 2 * acc_err * acc_ok / (acc_err + acc_ok))
    return {"f1": f1, "acc_error": acc_err, "acc_correct": acc_ok, "samples_with_error": n_err,
            "samples_without_error": n_ok}


def evaluate_step_scores(scores: Sequence[Sequence[float]], labels: Sequence[Sequence[int]],
                         threshold: float) -> dict[str, Any]:
    """Step-level ROC AUC and first-error F1 of per-step ``scores`` against per-step 0/1 ``labels``."""
    if [len(s) for s in scores] != [len(y) for y in labels]:
        raise ValueError("scores and labels must have one value per step of every sample")
    flat_s = [v for row in scores for v in row]
    flat_y = [v for row in labels for v in row]
    return {"auc": roc_auc(flat_s, flat_y), **first_error_f1(scores, labels, threshold), "threshold": threshold,
            "steps": len(flat_y), "samples": len(labels)}


@torch.no_grad()
def prm_step_scores(prm, dataset, batch_size: int = 32) -> list[list[float]]:
    """Each sample's step scores by a PRM (:class:`~halluc_rl.rewards.HFProcessReward`): its score of prompt +
    answer through each step's end, read from one teacher-forced forward per sample (the score its incremental
    scorer gives the same prefix)."""
    model = prm.scorer.model
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(dataset), batch_size):
        rows = dataset[start : start + batch_size]
        seqs = [p + r for p, r in zip(rows["prompt_ids"], rows["response_ids"])]
        width = max(map(len, seqs))
        ids = torch.zeros(len(seqs), width, dtype=torch.long)  # [B, T] right-padded
        mask = torch.zeros(len(seqs), width, dtype=torch.long)  # [B, T]
        for b, seq in enumerate(seqs):
            ids[b, : len(seq)], mask[b, : len(seq)] = torch.tensor(seq), 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # [B, T, L]
        for b, (prompt, ends) in enumerate(zip(rows["prompt_ids"], rows["step_ends"])):
            at = torch.tensor([len(prompt) + e for e in ends], device=device, dtype=torch.long)  # [S]
            out.append(prm.scorer._score(logits[b, at]).tolist() if len(ends) else [])
    return out


def implicit_step_scores(implicit, dataset) -> list[list[float]]:
    """Each sample's step scores by an :class:`~halluc_rl.rewards.ImplicitProcessReward`: the sum of its token
    rewards over the step (PRIME's step reward)."""
    out = []
    for prompt, response, ends in zip(dataset["prompt_ids"], dataset["response_ids"], dataset["step_ends"]):
        rewards = implicit.rescore(prompt, response) if response else torch.zeros(0)  # [T]
        bounds = [0, *[e + 1 for e in ends]]
        out.append([float(rewards[a:b].sum()) for a, b in zip(bounds[:-1], bounds[1:])])
    return out
