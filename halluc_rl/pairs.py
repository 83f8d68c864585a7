"""Preference pairs at a policy's own error points: what token-level DPO learns *when* to backtrack from.

1. :func:`find_errors` samples answers from the policy and finds each one's first error: by the oracle (the first
   token whose text leaves the reference; offline task), by a Monte-Carlo value drop (the first step, a line,
   after which the value of the state falls by ``min_drop`` or more; any task with a grader), or by a trained PRM
   (the first step it scores below ``prm_threshold``).
2. :func:`build_pairs` turns the error points into pairs. The prompt is the problem plus the policy's own action
   stream up to and including the erroneous tokens. Two forms:

   * ``single``: one action at that state: chosen ``<BT>``, rejected the policy's own next action;
   * ``continuation``: chosen backtracks over the error and then a right continuation (the reference's, or a
     successful Monte-Carlo branch's), rejected the policy's own continuation of the error.

   **Counter-pairs** keep the model from learning to delete correct text: at states that are still right, chosen is
   the right next token and rejected is ``<BT>``. ``counter_ratio`` sets how many per error pair.
   ``weighting="value_drop"`` resamples the error pairs in proportion to the value drop at their branch point, a
   token-level weighting that leaves the DPO loss as TRL computes it.

Every side is an action stream, scored by the shared scorer in the policy's semantics: in ``rewind`` the chosen
side's correction never attends to the deleted tokens; in ``retry`` it follows the error in context, and a
Monte-Carlo continuation is sampled from that context too.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import datasets
import torch

from halluc_rl.backtrack import BacktrackState, apply_actions
from halluc_rl.data.grading import reward as grade
from halluc_rl.data.tasks import Problem, encode_problem, format_solution
from halluc_rl.generation import BacktrackGenerationConfig
from halluc_rl.labels import line_break_ids, prm_step_scores
from halluc_rl.policy import policy_backtrack, policy_semantics
from halluc_rl.rewards import OracleProcessReward
from halluc_rl.rollout import rollout
from halluc_rl.values import mc_values


@dataclass
class ErrorPoint:
    """One sampled answer and where it first went wrong."""

    problem: Problem
    prompt_ids: list[int]
    actions: list[int]  # the policy's whole action stream
    end: int  # index in ``actions`` of the last erroneous action
    length: int  # visible tokens the error spans (backtracks needed to undo it)
    drop: float  # the value drop at the branch point (1.0 for the oracle)


@dataclass
class Samples:
    """The policy's sampled answers, and the states along them that are still right (for counter-pairs)."""

    errors: list[ErrorPoint]
    right_states: list[tuple[int, int]]  # (sample index, action index): the state before that action is right and
    # that action keeps it right
    prompts: list[list[int]]
    actions: list[list[int]]
    problems: list[Problem]
    num_samples: int


def _oracle_trace(oracle: OracleProcessReward, tokenizer, actions: Sequence[int], reference: str, bt: int,
                  question: str | None = None) -> list[bool]:
    """Whether the answer is right after each action (the oracle's potential, replayed; a ``deps`` ``question`` is
    judged by its checker, in any valid order)."""
    special = set(tokenizer.all_special_ids)
    state = BacktrackState(bt)
    out = []
    for a in actions:
        state.push(a)
        visible = state.visible_ids
        ended = bool(visible) and visible[-1] in special
        out.append(oracle.on_track(tokenizer.decode(visible, skip_special_tokens=True), reference, ended, question))
    return out


def find_errors(
    model,
    tokenizer,
    problems: Sequence[Problem],
    *,
    num_samples: int = 4,
    locate: str = "oracle",
    config: BacktrackGenerationConfig | None = None,
    generator: torch.Generator | None = None,
    mc_branches: int = 8,
    min_drop: float = 0.5,
    batch_size: int = 64,
    prm=None,
    prm_threshold: float = 0.5,
) -> Samples:
    """Sample ``num_samples`` answers per problem and find each one's first error. ``locate``: oracle; mc, the
    first step after which the Monte-Carlo value falls by ``min_drop``; or prm, the first step that ``prm`` (an
    :class:`~halluc_rl.rewards.HFProcessReward`) scores below ``prm_threshold``, the rule of ``halluc-rl prm
    eval``'s first-error F1."""
    if locate not in ("oracle", "mc", "prm"):
        raise ValueError(f"locate must be 'oracle', 'mc' or 'prm', got {locate!r}")
    if (locate == "prm") != (prm is not None):
        raise ValueError("give prm exactly when locate='prm'")
    bt, _ = policy_backtrack(model)
    config = config or BacktrackGenerationConfig(do_sample=True, loop_guard=None, max_new_tokens=128)
    oracle = OracleProcessReward(tokenizer)
    prompts, streams, owners = [], [], []
    for i in range(0, len(problems), batch_size):
        chunk = list(problems[i : i + batch_size])
        ro = rollout(model, tokenizer, chunk, num_samples=num_samples, config=config, generator=generator)
        for b in range(len(ro.problems)):
            streams.append(ro.actions[b][ro.action_mask[b]].tolist())
            prompts.append(ro.prompt_ids[b])
            owners.append(ro.problems[b])
    errors: list[ErrorPoint] = []
    right: list[tuple[int, int]] = []
    if locate == "oracle":
        for n, (problem, actions) in enumerate(zip(owners, streams)):
            reference = encode_reference(problem, tokenizer)
            trace = _oracle_trace(oracle, tokenizer, actions, reference, bt, problem.question)
            first = next((t for t, ok in enumerate(trace) if not ok), None)
            limit = len(actions) if first is None else first
            right += _counter_states(n, actions[:limit], bt)
            if first is not None and actions[first] != bt:
                errors.append(ErrorPoint(problem, prompts[n], actions, first, 1, 1.0))
    else:
        errors, right = _step_value_errors(model, tokenizer, owners, prompts, streams, bt, mc_branches, min_drop,
                                           config, generator, batch_size, prm, prm_threshold)
    return Samples(errors, right, prompts, streams, owners, len(streams))


def _counter_states(n: int, actions: Sequence[int], bt: int) -> list[tuple[int, int]]:
    """(sample, action index) of the right states where a counter-pair can ask "continue, not backtrack": a token
    was typed there, and the answer so far is not empty (a backtrack on an empty answer is masked: log-prob -inf)."""
    out, state = [], BacktrackState(bt)
    for t, a in enumerate(actions):
        if a != bt and len(state) > 0:
            out.append((n, t))
        state.push(a)
    return out


def encode_reference(problem: Problem, tokenizer) -> str:
    """The problem's reference solution as the oracle reads it (the library's one solution format)."""
    return format_solution(problem.solution, tokenizer)


def _step_ends(visible: Sequence[int], newline_ids: set[int]) -> list[int]:
    return [i + 1 for i, t in enumerate(visible) if t in newline_ids]


def _step_value_errors(model, tokenizer, problems, prompts, streams, bt, k, min_drop, config, generator,
                       batch_size, prm=None, prm_threshold=0.5):
    """The first wrong step (line); steps before it are right. Without ``prm``: the first step after which the
    Monte-Carlo value (Math-Shepherd, Wang et al. 2024) falls by ``min_drop``. With it: the first step the PRM
    scores below ``prm_threshold``. The final state's value is its grade either way."""
    newline_ids = line_break_ids(tokenizer)
    finals = [apply_actions(a, bt).visible_ids for a in streams]
    states, owner = [], []
    for n, visible in enumerate(finals):
        for end in [0, *_step_ends(visible, newline_ids)]:
            states.append(visible[:end])
            owner.append(n)
    if prm is not None:  # one teacher-forced PRM forward per answer scores all of its states (read at their ends)
        ends = [[end - 1 for end in [0, *_step_ends(visible, newline_ids)]] for visible in finals]  # -1: the prompt
        rows = datasets.Dataset.from_dict({"prompt_ids": prompts, "response_ids": finals, "step_ends": ends})
        values = [v for scores in prm_step_scores(prm, rows, batch_size) for v in scores]
    else:
        options = {"max_new_tokens": config.max_new_tokens, "loop_guard": None, "temperature": config.temperature}
        values = mc_values(model, tokenizer, [problems[n] for n in owner], states, k, batch_size=batch_size,
                           generator=generator, prompts=[prompts[n] for n in owner], **options).values.tolist()
    errors, right = [], []
    by_sample: dict[int, list[tuple[list[int], float]]] = {}
    for n, state, value in zip(owner, states, values):
        by_sample.setdefault(n, []).append((state, value))
    for n, chain in by_sample.items():
        outcome = grade(tokenizer.decode(finals[n], skip_special_tokens=True), problems[n].answer)
        chain = [*chain, (finals[n], outcome)]
        limit = len(streams[n])
        for (before, v0), (after, v1) in zip(chain, chain[1:]):
            if (v1 < prm_threshold) if prm is not None else (v0 - v1 >= min_drop):
                end = _action_index_of_visible(streams[n], bt, len(after))
                drop = 1.0 - v1 if prm is not None else v0 - v1  # a PRM's: how sure it is that the step is wrong
                errors.append(ErrorPoint(problems[n], prompts[n], streams[n], end, len(after) - len(before), drop))
                limit = _action_index_of_visible(streams[n], bt, len(before)) + 1 if before else 0
                break
        right += _counter_states(n, streams[n][:limit], bt)
    return errors, right


def _action_index_of_visible(actions: Sequence[int], bt: int, length: int) -> int:
    """The index of the action after which the visible response first reaches ``length`` tokens for good."""
    state = BacktrackState(bt)
    index = len(actions) - 1
    for t, a in enumerate(actions):
        state.push(a)
        if len(state) == length:
            index = t
    return index


@dataclass
class PreferencePair:
    """TRL's pre-tokenised preference row, plus ``floor``: the problem prompt's length (never backtracked into)."""

    prompt_ids: list[int]  # the problem prompt, then the policy's own actions up to the branch point
    chosen_ids: list[int]  # actions
    rejected_ids: list[int]  # actions
    floor: int
    kind: str  # "error" or "counter"
    drop: float = 1.0

    def as_row(self) -> dict:
        return {"prompt_ids": self.prompt_ids, "chosen_ids": self.chosen_ids, "rejected_ids": self.rejected_ids,
                "floor": self.floor, "kind": self.kind}


def _right_continuation(error: ErrorPoint, tokenizer, bt: int) -> list[int] | None:
    """The reference's remaining tokens after the error is deleted (None if the kept text is off the reference)."""
    kept = apply_actions(error.actions[: error.end + 1] + [bt] * error.length, bt).visible_ids
    _, reference = encode_problem(error.problem, tokenizer)
    if reference[: len(kept)] != kept:
        return None
    return reference[len(kept):]


def _sampled_continuations(model, tokenizer, errors: list[ErrorPoint], bt: int, k: int, config, generator):
    """A successful Monte-Carlo branch from each error's state once the error is deleted, as actions from that
    state (None where no branch succeeded). In ``retry`` the branch starts from the whole stream, the error and
    its backtracks in context."""
    deleted = [e.actions[: e.end + 1] + [bt] * e.length for e in errors]
    kept = [apply_actions(stream, bt).visible_ids for stream in deleted]
    starts = deleted if policy_semantics(model) == "retry" else kept
    est = mc_values(model, tokenizer, [e.problem for e in errors], starts, k, prompts=[e.prompt_ids for e in errors],
                    generator=generator, max_new_tokens=config.max_new_tokens, loop_guard=None,
                    temperature=config.temperature)
    out: list[list[int] | None] = []
    for state, wins, finals in zip(kept, est.successes.tolist(), est.sequences):
        j = next((j for j, w in enumerate(wins) if w > 0), None)
        if j is None:
            out.append(None)
            continue
        final = finals[j]
        common = next((i for i, (a, b) in enumerate(zip(state, final)) if a != b), min(len(state), len(final)))
        out.append([bt] * (len(state) - common) + final[common:])
    return out


def build_pairs(
    samples: Samples,
    tokenizer,
    backtrack_id: int,
    *,
    form: str = "single",
    continuation: str = "reference",
    model=None,
    mc_branches: int = 8,
    config: BacktrackGenerationConfig | None = None,
    generator: torch.Generator | None = None,
    counter_ratio: float = 1.0,
    weighting: str = "none",
    seed: int = 0,
    min_pairs: int = 1,
) -> list[PreferencePair]:
    """Pairs at the error points of ``samples`` (see the module docstring), plus counter-pairs.

    ``continuation`` (continuation form): ``reference`` (the offline task's reference after the kept text) or
    ``sampled`` (a successful branch of ``model`` from that state, ``mc_branches`` tries; any task). Raises a
    ``ValueError`` with the count and how to get more when fewer than ``min_pairs`` error pairs result.
    """
    if form not in ("single", "continuation"):
        raise ValueError(f"form must be 'single' or 'continuation', got {form!r}")
    if continuation not in ("reference", "sampled") or (continuation == "sampled" and model is None):
        raise ValueError("continuation must be 'reference', or 'sampled' with the model to sample from")
    if weighting not in ("none", "value_drop"):
        raise ValueError(f"weighting must be 'none' or 'value_drop', got {weighting!r}")
    rng = random.Random(seed)
    bt = backtrack_id
    pairs: list[PreferencePair] = []
    errors = [e for e in samples.errors if e.end + 1 < len(e.actions)]  # stopped on its error: nothing to reject
    if form == "continuation" and continuation == "sampled" and errors:
        config = config or BacktrackGenerationConfig(do_sample=True, max_new_tokens=128)
        rights = _sampled_continuations(model, tokenizer, errors, bt, mc_branches, config, generator)
    else:
        rights = [None] * len(errors)
    for e, sampled in zip(errors, rights):
        prompt = e.prompt_ids + e.actions[: e.end + 1]
        own = e.actions[e.end + 1:]
        if form == "single":
            chosen, rejected = [bt], own[:1]
        else:
            right = sampled if continuation == "sampled" else _right_continuation(e, tokenizer, bt)
            if right is None:
                continue
            chosen, rejected = [bt] * e.length + right, own
        pairs.append(PreferencePair(prompt, chosen, rejected, len(e.prompt_ids), "error", e.drop))
    if len(pairs) < min_pairs:
        raise ValueError(
            f"only {len(pairs)} error pairs from {samples.num_samples} sampled answers ({len(samples.errors)} "
            f"errors found); need {min_pairs}: sample more answers (num_problems, num_samples) or at a higher "
            "temperature, so that the policy makes more mistakes to learn from"
        )
    if weighting == "value_drop" and pairs:
        total = sum(p.drop for p in pairs)
        pairs = rng.choices(pairs, weights=[p.drop / total for p in pairs], k=len(pairs))
    counters = []
    wanted = int(round(counter_ratio * len(pairs)))
    for n, t in rng.sample(samples.right_states, min(wanted, len(samples.right_states))):
        prompt = samples.prompts[n] + samples.actions[n][:t]
        counters.append(PreferencePair(prompt, [samples.actions[n][t]], [bt], len(samples.prompts[n]), "counter"))
    return pairs + counters
