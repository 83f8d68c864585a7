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

Evaluation, ProcessBench style (Zheng et al. 2024, "ProcessBench: Identifying Process Errors in Mathematical
Reasoning"): :func:`roc_auc` over steps, and :func:`first_error_f1` over samples (:func:`evaluate_step_scores`
gives both). :func:`prm_step_scores` and :func:`implicit_step_scores` turn a PRM into per-step scores.
:func:`training_rows`, :class:`StepLabelCollator` and :func:`step_loss` are what ``halluc-rl prm`` trains with.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from halluc_rl.adapters import base_fingerprint
from halluc_rl.backtrack import stop_token_ids
from halluc_rl.data.grading import reward as grade
from halluc_rl.data.tasks import Problem, encode_problem, format_solution
from halluc_rl.generation import BacktrackGenerationConfig, generate
from halluc_rl.losses import IGNORE_INDEX
from halluc_rl.policy import policy_backtrack
from halluc_rl.values import mc_values

CACHE_VERSION = 1
RECORD_FILE = "halluc_rl_labels.json"
"""The record of what made a label cache, saved inside its folder."""

# ----------------------------------------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------------------------------------


def newline_token_ids(tokenizer) -> list[int]:
    """Ids of the tokens whose text ends with a newline: the tokens that close a step."""
    ids = [i for i in range(len(tokenizer)) if tokenizer.decode([i]).endswith("\n")]
    if not ids:
        raise ValueError("the tokenizer has no token ending in a newline; steps (lines) cannot be found")
    return ids


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
    unfinished one is judged as a prefix. For tasks with unique solutions (``ArithmeticTask``).
    """
    from halluc_rl.rewards import OracleProcessReward

    oracle = OracleProcessReward(tokenizer)  # token granularity: the text through the step's end is judged
    reference = format_solution(problem.solution, tokenizer)
    ended = bool(response_ids) and response_ids[-1] in set(tokenizer.all_special_ids)
    return [int(oracle.on_track(tokenizer.decode(list(response_ids[: e + 1]), skip_special_tokens=True), reference,
                                ended and j == len(ends) - 1)) for j, e in enumerate(ends)]


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
# The cache and its record
# ----------------------------------------------------------------------------------------------------------------


def _hash_tensors(tensors: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        value = tensors[name].detach().to("cpu")
        digest.update(f"{name}:{tuple(value.shape)}:{value.dtype}".encode())
        digest.update(value.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _peft_base_fingerprint(model) -> str:
    """:func:`halluc_rl.adapters.base_fingerprint`'s rule (the first and last matrices, rounded to bf16) over a
    PEFT model's base weights: every parameter not stored under an adapter's name, ``.base_layer`` dropped from
    the names. The same for the same base whether the adapter was just trained or loaded from disk."""
    adapters = tuple(model.peft_config)

    def is_adapter(name: str) -> bool:
        return any(f".{a}." in name or name.endswith(f".{a}") for a in adapters)

    matrices = [(n.replace(".base_layer", ""), p) for n, p in model.named_parameters() if p.ndim == 2 and not
                is_adapter(n)]
    digest = hashlib.sha256()
    for name, param in dict([matrices[0], matrices[-1]]).items():
        digest.update(name.encode())
        digest.update(param.detach().to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]


def policy_fingerprint(model) -> dict[str, Any]:
    """What identifies a policy: its base weights, the weights trained on top, and its backtrack settings.

    A PEFT policy: a fingerprint of its base weights (:func:`_peft_base_fingerprint`) and a hash of its adapter's
    weights (``get_peft_model_state_dict``: LoRA, the trainable backtrack rows, saved modules). A full model:
    :func:`halluc_rl.adapters.base_fingerprint` and a hash of every weight.
    """
    bt, head = policy_backtrack(model)
    record: dict[str, Any] = {"backtrack_token_id": bt, "backtrack_head": head}
    from peft import PeftModel, get_peft_model_state_dict

    if isinstance(model, PeftModel):
        record["base"] = _peft_base_fingerprint(model)
        record["adapter"] = _hash_tensors(get_peft_model_state_dict(model))
    else:
        record["base"] = base_fingerprint(model)
        record["weights"] = _hash_tensors(dict(model.named_parameters()))
    return record


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the vocabulary and the EOS id (what token ids mean)."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return hashlib.sha256(json.dumps([vocab, tokenizer.eos_token_id]).encode()).hexdigest()[:16]


def problems_fingerprint(problems: Sequence[Problem]) -> str:
    return hashlib.sha256(json.dumps([[p.question, p.solution, p.answer] for p in problems]).encode()).hexdigest()[:16]


def label_record(model, tokenizer, problems: Sequence[Problem], settings: LabelSettings,
                 task: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What made a set of labels: the policy, its tokenizer, the task (``task``: its name, split and settings, as
    the caller describes them, plus a hash of the problems themselves) and the label settings."""
    return {"version": CACHE_VERSION, "policy": policy_fingerprint(model), "tokenizer": tokenizer_fingerprint(tokenizer),
            "task": {**dict(task or {}), "num_problems": len(problems), "problems": problems_fingerprint(problems)},
            "settings": asdict(settings)}


def _flatten(record: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in record.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


_RECORD_ORDER = ("version", "policy", "tokenizer", "task", "settings")


def record_differences(saved: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """``key: saved vs wanted`` for every recorded value that differs (the policy first, then the task...)."""
    a, b = _flatten(saved), _flatten(wanted)

    def order(key: str) -> tuple[int, str]:
        top = key.split(".")[0]
        return (_RECORD_ORDER.index(top) if top in _RECORD_ORDER else len(_RECORD_ORDER), key)

    return [f"{key}: {a.get(key)!r} vs {b.get(key)!r}" for key in sorted(set(a) | set(b), key=order)
            if a.get(key) != b.get(key)]


def load_label_cache(path: str | Path, record: Mapping[str, Any]):
    """The cached labels at ``path`` if they were made as ``record`` says; None when there is no cache there.

    A cache made otherwise is refused with a :class:`~halluc_rl.config.UsageError` naming the differences.
    """
    import datasets

    from halluc_rl.config import UsageError

    path = Path(path)
    if not path.exists():
        return None
    file = path / RECORD_FILE
    if not file.exists():
        raise UsageError(f"{path} exists but is not a label cache (no {RECORD_FILE}); give another path or move it")
    saved = json.loads(file.read_text())
    diff = record_differences(saved, record)
    if diff:
        more = f" (+{len(diff) - 4} more)" if len(diff) > 4 else ""
        raise UsageError(f"label cache {path} was made by another policy, task or setting ({'; '.join(diff[:4])}"
                         f"{more}: saved vs now); delete it or give another label cache path")
    return datasets.load_from_disk(str(path))


def save_label_cache(dataset, path: str | Path, record: Mapping[str, Any]) -> Path:
    """Save ``dataset`` and its record into a temporary folder beside ``path``, then rename it into place.

    Raises ``FileExistsError`` when another process put a cache at ``path`` first (this one is then dropped).
    """
    from halluc_rl.atomic import atomic_write_json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        dataset.save_to_disk(str(tmp))
        atomic_write_json(tmp / RECORD_FILE, dict(record))
        try:
            os.replace(tmp, path)
        except OSError as err:
            if path.exists():
                raise FileExistsError(f"{path} appeared while the labels were being made") from err
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


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


# ----------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------


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
