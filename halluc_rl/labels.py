"""Step labels for process reward models (PRMs), and the one yardstick every PRM is measured with.

A *step* is a line of the answer: it ends with a newline token, and the answer's end closes the last step
(:func:`step_ends`). Two kinds of labels, both per step of a response the policy itself wrote:

* **oracle** (:func:`oracle_step_labels`): the offline task's ground truth. A step is right iff the text through
  it is still on the reference solution (:meth:`halluc_rl.rewards.OracleProcessReward.on_track`); once a step is
  wrong, every later one is too.
* **Monte-Carlo** (Math-Shepherd; Wang et al. 2024, "Math-Shepherd: Verify and Reinforce LLMs Step-by-step without
  Human Annotations"): K continuations of each step's prefix by the policy (:func:`halluc_rl.values.mc_values`,
  branched from one cached state); the *soft* label is the share that reach the right answer, the *hard* label
  whether any does.

:func:`step_labels` samples the policy's answers, labels them and caches the result on disk as a
``datasets.Dataset``, with a record of what made it (:func:`label_record`). A rerun reuses it; a cache made by
another policy, task or setting is refused in one line naming what differs, never silently reused.

The cache and its fingerprints are in :mod:`halluc_rl.label_cache`. Evaluation, ProcessBench style, is in
:mod:`halluc_rl.prm_metrics`: :func:`roc_auc` over steps, :func:`first_error_f1` over samples
(:func:`evaluate_step_scores` gives both); :func:`prm_step_scores` and :func:`implicit_step_scores` turn a PRM into
per-step scores. Those names are re-exported here.
:func:`training_rows`, :class:`StepLabelCollator` and :func:`step_loss` are what ``halluc-rl prm`` trains with.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from halluc_rl.backtrack import stop_token_ids
from halluc_rl.data.grading import reward as grade
from halluc_rl.data.problems import Problem, encode_problem, format_solution
from halluc_rl.generation import BacktrackGenerationConfig, generate
from halluc_rl.label_cache import (
    CACHE_VERSION,
    RECORD_FILE,
    load_label_cache,
    policy_fingerprint,
    problems_fingerprint,
    record_differences,
    save_label_cache,
    tokenizer_fingerprint,
)
from halluc_rl.losses import IGNORE_INDEX
from halluc_rl.prm_metrics import (
    evaluate_step_scores,
    first_error,
    first_error_f1,
    implicit_step_scores,
    prm_step_scores,
    roc_auc,
)
from halluc_rl.rewards import OracleProcessReward
from halluc_rl.values import mc_values

# ----------------------------------------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------------------------------------


def newline_token_ids(tokenizer) -> list[int]:
    """Ids of the tokens whose text ends with a newline: the tokens that close a step."""
    ids = [i for i in range(len(tokenizer)) if tokenizer.decode([i]).endswith("\n")]
    if not ids:
        raise ValueError("the tokenizer has no token ending in a newline; steps (lines) cannot be found")
    return ids


def line_break_ids(tokenizer) -> set[int]:
    """Ids of the tokens whose text holds a newline anywhere: where Monte-Carlo values are taken (VinePPO's states,
    DPO's value drops). Wider than :func:`newline_token_ids`, which keeps those that *end* a line."""
    return {i for t, i in tokenizer.get_vocab().items() if "\n" in tokenizer.convert_tokens_to_string([t])}


def step_token_ids(tokenizer) -> list[int]:
    """What a step-level :class:`~halluc_rl.rewards.HFProcessReward` should score at: newlines and EOS (the EOS
    closes the last step, which has no newline)."""
    return sorted({*newline_token_ids(tokenizer), int(tokenizer.eos_token_id)})


def step_ends(response_ids: Sequence[int], newline_ids: Sequence[int] | set[int],
              stop_ids: Sequence[int] | set[int] = ()) -> list[int]:
    """Indices of the tokens that close each step of a visible response (empty for an empty response).

    Each newline token closes a step, and the last token closes the last one. A stop token right after a newline
    joins the step it follows (``"...\\n</s>"`` ends one step, not an empty one).
    """
    newline_ids, stop_ids = set(newline_ids), set(stop_ids)
    ends = [i for i, token in enumerate(response_ids) if token in newline_ids]
    last = len(response_ids) - 1
    if last < 0 or (ends and ends[-1] == last):
        return ends
    if ends and ends[-1] == last - 1 and response_ids[last] in stop_ids:
        ends[-1] = last
    else:
        ends.append(last)
    return ends


def oracle_step_labels(tokenizer, problem: Problem, response_ids: Sequence[int], ends: Sequence[int]) -> list[int]:
    """1 for each step whose text (through its last token) is still on the reference solution, else 0.

    A response that ended (its last token is special: EOS) must equal the reference at its last step; an
    unfinished one is judged as a prefix. For tasks with unique solutions (``ArithmeticTask``), and for ``deps``,
    whose checker accepts every valid order (:meth:`OracleProcessReward.on_track`).
    """
    oracle = OracleProcessReward(tokenizer)  # token granularity: the text through the step's end is judged
    reference = format_solution(problem.solution, tokenizer)
    ended = bool(response_ids) and response_ids[-1] in set(tokenizer.all_special_ids)
    return [int(oracle.on_track(tokenizer.decode(list(response_ids[: e + 1]), skip_special_tokens=True), reference,
                                ended and j == len(ends) - 1, problem.question)) for j, e in enumerate(ends)]


# ----------------------------------------------------------------------------------------------------------------
# Making labels
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class LabelSettings:
    """How step labels are made (all recorded with a cache: another value is another cache)."""

    samples_per_problem: int = 4
    """Answers sampled from the policy per problem."""
    k: int = 8
    """Monte-Carlo continuations per step (0: no MC labels, only oracle ones)."""
    oracle: bool = True
    """Also give oracle labels (the offline task only: its solutions are unique)."""
    seed: int = 0
    """Seeds the sampling of answers and continuations."""
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 128
    """Actions per sampled answer, backtracks included."""
    mc_max_new_tokens: int = 128
    """Actions per continuation."""
    loop_guard: int | None = None
    """The loop guard of sampling (None: off, the policy's own distribution)."""
    batch_size: int = 256
    """Rows decoded together (the random stream depends on it, so it is part of the record)."""


def _sampling(settings: LabelSettings, max_new_tokens: int) -> BacktrackGenerationConfig:
    return BacktrackGenerationConfig(max_new_tokens=max_new_tokens, do_sample=True, temperature=settings.temperature,
                                     top_k=settings.top_k, top_p=settings.top_p, loop_guard=settings.loop_guard)


def make_step_labels(model, tokenizer, problems: Sequence[Problem], settings: LabelSettings | None = None,
                     announce: Callable[[str], None] = print):
    """Sample ``settings.samples_per_problem`` answers per problem from the policy and label every step.

    Returns a ``datasets.Dataset``, one row per sampled answer: ``problem_index``, ``question``, ``answer``,
    ``prompt_ids``, ``response_ids`` (the visible answer, EOS included when it ended), ``finished``, ``correct``
    (its outcome), ``step_ends`` (indices into ``response_ids``) and per step ``oracle`` (0/1), ``mc_soft``
    (success share) and ``mc_hard`` (any success). A step closed by the stop token is the finished answer: its MC
    labels are its own outcome, exactly (nothing is left to sample).
    """
    import datasets

    settings = settings or LabelSettings()
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(settings.seed)
    n = settings.samples_per_problem
    newline = set(newline_token_ids(tokenizer))
    stops = set(stop_token_ids(tokenizer, getattr(model, "generation_config", None)))
    rows: dict[str, list] = {key: [] for key in ("problem_index", "question", "answer", "prompt_ids", "response_ids",
                                                 "finished", "correct", "step_ends")}
    per_call = max(1, settings.batch_size // n)
    for start in range(0, len(problems), per_call):
        chunk = list(problems[start : start + per_call])
        prompts = [encode_problem(p, tokenizer)[0] for p in chunk]
        out = generate(model, tokenizer, prompts, _sampling(settings, settings.max_new_tokens), num_branches=n,
                       generator=generator)
        for j, (ids, text) in enumerate(zip(out.sequences, out.texts)):
            problem = chunk[j // n]
            rows["problem_index"].append(start + j // n)
            rows["question"].append(problem.question)
            rows["answer"].append(problem.answer)
            rows["prompt_ids"].append(out.prompt_ids[j])
            rows["response_ids"].append(ids)
            rows["finished"].append(bool(out.finished[j]))
            rows["correct"].append(float(grade(text, problem.answer)))
            rows["step_ends"].append(step_ends(ids, newline, stops))
    announce(f"labels: sampled {len(rows['response_ids'])} answers to {len(problems)} problems "
             f"({sum(map(len, rows['step_ends']))} steps)")
    if settings.oracle:
        rows["oracle"] = [oracle_step_labels(tokenizer, problems[i], ids, ends) for i, ids, ends
                          in zip(rows["problem_index"], rows["response_ids"], rows["step_ends"])]
    if settings.k > 0:
        rows["mc_soft"], rows["mc_hard"] = _mc_labels(model, tokenizer, problems, rows, settings, stops, generator)
        announce(f"labels: {settings.k} continuations per open step, Monte-Carlo labels done")
    return datasets.Dataset.from_dict(rows)


def _mc_labels(model, tokenizer, problems, rows, settings, stops, generator) -> tuple[list, list]:
    """Success share (soft) and any success (hard) per step: one batched :func:`mc_values` call over every open
    step's prefix; a step closed by a stop token is the finished answer, labelled by its outcome."""
    states, where = [], []  # (problem, prompt, prefix) of every open step, and its (row, step)
    soft = [[0.0] * len(ends) for ends in rows["step_ends"]]
    for r, (ids, ends) in enumerate(zip(rows["response_ids"], rows["step_ends"])):
        for s, e in enumerate(ends):
            if ids[e] in stops:
                soft[r][s] = rows["correct"][r]
            else:
                states.append((problems[rows["problem_index"][r]], rows["prompt_ids"][r], ids[: e + 1]))
                where.append((r, s))
    if states:
        est = mc_values(model, tokenizer, [s[0] for s in states], [s[2] for s in states], settings.k,
                        _sampling(settings, settings.mc_max_new_tokens), prompts=[s[1] for s in states],
                        batch_size=max(1, settings.batch_size // settings.k), generator=generator)
        for (r, s), value in zip(where, est.values.tolist()):
            soft[r][s] = value
    hard = [[int(v > 0) for v in row] for row in soft]
    return soft, hard


# ----------------------------------------------------------------------------------------------------------------
# The record and the cached labels
# ----------------------------------------------------------------------------------------------------------------


def label_record(model, tokenizer, problems: Sequence[Problem], settings: LabelSettings,
                 task: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What made a set of labels: the policy, its tokenizer, the task (``task``: its name, split and settings, as
    the caller describes them, plus a hash of the problems themselves) and the label settings."""
    return {"version": CACHE_VERSION, "policy": policy_fingerprint(model), "tokenizer": tokenizer_fingerprint(tokenizer),
            "task": {**dict(task or {}), "num_problems": len(problems), "problems": problems_fingerprint(problems)},
            "settings": asdict(settings)}


def step_labels(model, tokenizer, problems: Sequence[Problem], settings: LabelSettings | None = None, *,
                task: Mapping[str, Any] | None = None, cache: str | Path | None = None,
                announce: Callable[[str], None] = print):
    """:func:`make_step_labels`, cached at ``cache``: reused when the policy, task and settings are the ones that
    made it, refused (one line naming what differs) when they are not, made and saved atomically when absent.

    ``task`` describes the problems for the record (say ``{"task": "arithmetic", "split": "train", "seed": 0}``);
    the problems' own hash is recorded too.
    """
    settings = settings or LabelSettings()
    if cache is None:
        return make_step_labels(model, tokenizer, problems, settings, announce)
    record = label_record(model, tokenizer, problems, settings, task)
    found = load_label_cache(cache, record)
    if found is not None:
        announce(f"labels: reusing {cache} ({len(found)} answers)")
        return found
    dataset = make_step_labels(model, tokenizer, problems, settings, announce)
    try:
        save_label_cache(dataset, cache, record)
    except FileExistsError:  # another run made them meanwhile: theirs is kept, if it was made the same way
        return load_label_cache(cache, record)
    announce(f"labels: saved to {cache}")
    return dataset


# ----------------------------------------------------------------------------------------------------------------
# Training a PRM
# ----------------------------------------------------------------------------------------------------------------


def training_rows(labels, head: str, label_type: str, max_length: int):
    """What a PRM trains on, per answer: ``input_ids`` (prompt + answer) and float ``labels``, -100 except at
    each step's last token: the hard MC labels for a ``classification`` head, the soft ones for a ``scalar`` head,
    or the ``oracle`` ones."""
    import datasets

    column = {"oracle": "oracle", "mc": "mc_hard" if head == "classification" else "mc_soft"}[label_type]
    rows: dict[str, list] = {"input_ids": [], "labels": []}
    for prompt, response, ends, values in zip(labels["prompt_ids"], labels["response_ids"], labels["step_ends"],
                                              labels[column]):
        ids = [*prompt, *response][:max_length]
        targets = [float(IGNORE_INDEX)] * len(ids)
        for end, value in zip(ends, values):
            if len(prompt) + end < len(ids):
                targets[len(prompt) + end] = float(value)
        if any(t != IGNORE_INDEX for t in targets):
            rows["input_ids"].append(ids)
            rows["labels"].append(targets)
    return datasets.Dataset.from_dict(rows)


@dataclass
class StepLabelCollator:
    """Right-pads ``input_ids`` (with ``pad_token_id``) and ``labels`` (with -100) into [B, T] tensors."""

    pad_token_id: int

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)  # [B, T]
        mask = torch.zeros(len(rows), width, dtype=torch.long)  # [B, T]
        labels = torch.full((len(rows), width), float(IGNORE_INDEX))  # [B, T]
        for b, row in enumerate(rows):
            n = len(row["input_ids"])
            ids[b, :n], mask[b, :n], labels[b, :n] = torch.tensor(row["input_ids"]), 1, torch.tensor(row["labels"])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def step_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean loss over labelled positions: cross-entropy on 0/1 labels (two logits) or BCE on soft labels (one)."""
    mask = labels != IGNORE_INDEX  # [B, T]
    picked = logits[mask].float()  # [N, L]
    if logits.shape[-1] == 1:
        return torch.nn.functional.binary_cross_entropy_with_logits(picked[:, 0], labels[mask].float())
    return torch.nn.functional.cross_entropy(picked, labels[mask].long())


__all__ = [
    "CACHE_VERSION", "RECORD_FILE", "LabelSettings", "StepLabelCollator", "evaluate_step_scores", "first_error",
    "first_error_f1", "implicit_step_scores", "label_record", "load_label_cache", "make_step_labels",
    "newline_token_ids", "oracle_step_labels", "policy_fingerprint", "prm_step_scores", "problems_fingerprint",
    "record_differences", "roc_auc", "save_label_cache", "step_ends", "step_labels", "step_loss", "step_token_ids",
    "tokenizer_fingerprint", "training_rows",
]
