"""The decoding rules and records: the options, the masks every action's scores get, and what generation returns.

One home for what generation (:mod:`halluc_rl.engine`) and the scorer (:mod:`halluc_rl.scoring`) must agree on:
:func:`mask_scores` (the backtrack bias, the budget, the empty-response mask, the loop guard's bans),
:class:`LoopGuard`, and the log-prob convention of ``return_logprobs`` (:func:`decoding_log_probs`). The scorer
replays an action stream through these very objects, so its log-probs equal the sampling ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from halluc_rl.backtrack import ActionKind, BatchedBacktrackState, StepEvent
from halluc_rl.losses import action_log_probs


@dataclass
class BacktrackGenerationConfig:
    """Decoding options. ``max_new_tokens`` counts actions (backtracks included), not visible tokens."""

    max_new_tokens: int = 128
    """Actions per sequence, backtracks included."""
    do_sample: bool = False
    """Sample (True) or take the argmax (False)."""
    temperature: float = 1.0
    """Softmax temperature when sampling."""
    top_k: int = 0
    """Keep the k most likely tokens when sampling (0: off)."""
    top_p: float = 1.0
    """Nucleus sampling mass (1.0: off)."""
    backtrack_bias: float = 0.0
    """Added to the backtrack logit: negative to backtrack less, ``-inf`` never."""
    backtrack_budget: int | None = None
    """Backtracks allowed per sequence; once spent, the backtrack token is masked (None: unlimited)."""
    loop_guard: int | None = 3
    """After a token is deleted this many times at the same visible state (the same prefix), it may not be typed
    there again (None: off)."""
    allow_failed_backtracks: bool = False
    """Let the model choose a backtrack on an empty response. Such a backtrack is always a no-op: the visible text,
    and so the next logits, stay the same, so by default it is masked. Forced actions may still contain one."""
    stop_strings: tuple[str, ...] = ()
    """Stop a sequence once its visible text ends with one of these."""
    eos_token_id: int | list[int] | None = None
    """Stop tokens (default: the tokenizer's EOS). The stop token is kept in the visible ids, as generate does."""
    return_logprobs: bool = False
    """Also return each action's log-prob under ``softmax(logits / temperature)``, the usual RL convention: it
    includes the backtrack bias and the masks (budget, empty response, loop guard) but not top-k/top-p, so a
    trainer that recomputes it from the model's logits must apply the same bias and masks (the trace has what it
    needs) and should sample with top_k=0, top_p=1."""
    compact_min_holes: int = 32
    """Compact the cache once this many dead slots (and a quarter of its length) pile up."""


class StepCallback(Protocol):
    """A follower of the decoding (reward models, value followers): told the prompts, then every step."""

    def on_prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None: ...
    def on_step(self, event: StepEvent) -> None: ...


@dataclass
class TraceEvent:
    """One action of one sequence."""

    step: int
    action: int
    kind: ActionKind
    deleted: int | None
    position: int


@dataclass
class BacktrackGenerationOutput:
    """Visible results plus the per-step trace ([B, S] tensors, S = steps run; padding where a row was done)."""

    sequences: list[list[int]]
    texts: list[str]
    actions: torch.Tensor  # [B, S] action ids, -1 after the row finished
    kinds: torch.Tensor  # [B, S] ActionKind codes, -1 after the row finished
    deleted: torch.Tensor  # [B, S] deleted token id, -1 where none
    positions: torch.Tensor  # [B, S] response index written or deleted
    num_backtracks: torch.Tensor  # [B]
    num_deleted: torch.Tensor  # [B]
    num_failed: torch.Tensor  # [B]
    finished: torch.Tensor  # [B] stopped by EOS or a stop string (False: ran out of actions)
    logprobs: torch.Tensor | None = None  # [B, S]
    prompt_ids: list[list[int]] = field(default_factory=list)
    config: BacktrackGenerationConfig | None = None  # the options it ran with (the scorer applies the same rules)
    backtrack_id: int = -1
    backtrack_head: str = "softmax"
    semantics: str = "rewind"  # what the model conditioned on (halluc_rl.backtrack.SEMANTICS)

    @property
    def action_mask(self) -> torch.Tensor:
        """[B, S] true where the row took an action."""
        return self.kinds >= 0

    def trace(self, row: int) -> list[TraceEvent]:
        """Row ``row``'s actions in order."""
        out = []
        for s in range(self.kinds.shape[1]):
            kind = int(self.kinds[row, s])
            if kind < 0:
                break
            deleted = int(self.deleted[row, s])
            out.append(TraceEvent(s, int(self.actions[row, s]), ActionKind(kind), deleted if deleted >= 0 else None,
                                  int(self.positions[row, s])))
        return out


class LoopGuard:
    """A visited memory: bans re-typing a token at a visible state after it was deleted there ``limit`` times.

    A state is the row's visible response (its prefix), as Self-Backtracking's visited set keys it (Yang et al.
    2025): after a deeper backtrack and a different prefix, a token deleted at the same *length* is allowed again.
    Generation records each step's deletions and asks for the bans of the current states; the scorer replays an
    action stream through the same object, so both mask the same tokens.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.counts: dict[tuple[int, tuple[int, ...], int], int] = {}
        self.bans: dict[int, dict[tuple[int, ...], list[int]]] = {}  # row -> visible prefix -> banned tokens
        self._lengths: dict[int, set[int]] = {}  # row -> lengths of its banned prefixes (to skip rows cheaply)

    def record(self, kinds: torch.Tensor, deleted: torch.Tensor, state: BatchedBacktrackState) -> None:
        """Count this step's deletions: ``kinds`` and ``deleted`` are [B]; ``state`` is after the step."""
        rows = torch.nonzero(kinds == int(ActionKind.DELETE)).flatten().tolist()
        for b in rows:
            prefix = tuple(state.visible(b))
            key = (b, prefix, int(deleted[b]))
            self.counts[key] = self.counts.get(key, 0) + 1
            if self.counts[key] == self.limit:
                self.bans.setdefault(b, {}).setdefault(prefix, []).append(key[2])
                self._lengths.setdefault(b, set()).add(len(prefix))

    def banned(self, state: BatchedBacktrackState) -> list[tuple[int, int]]:
        """(row, token) pairs banned at the rows' current visible states."""
        out = []
        for b, by_prefix in self.bans.items():
            if int(state.lengths[b]) in self._lengths[b]:  # only then can the prefix match: read it
                out += [(b, t) for t in by_prefix.get(tuple(state.visible(b)), ())]
        return out


def mask_scores(scores: torch.Tensor, backtrack_id: int, config: BacktrackGenerationConfig, lengths: torch.Tensor,
                num_backtracks: torch.Tensor, bans: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
    """Apply the decoding rules to ``scores`` [..., V] in place and return it: the one home of these masks.

    The backtrack bias; the budget (``num_backtracks`` [...] spent: no backtrack); the empty-response mask
    (``lengths`` [...] zero: a backtrack would be a no-op); the loop guard's ``bans`` (index tensors into ``scores``,
    the last one the token). Generation applies it to each step's [B, V] scores, the scorer to [B, S, V].
    """
    if config.backtrack_bias:
        scores[..., backtrack_id] += config.backtrack_bias
    if config.backtrack_budget is not None:
        spent = num_backtracks >= config.backtrack_budget  # [...]
        scores[..., backtrack_id] = scores[..., backtrack_id].masked_fill(spent, float("-inf"))
    if not config.allow_failed_backtracks:
        scores[..., backtrack_id] = scores[..., backtrack_id].masked_fill(lengths == 0, float("-inf"))
    if bans is not None and bans[0].numel():
        scores[bans] = float("-inf")
    return scores


def decoding_scores(logits: torch.Tensor, backtrack_id: int, head: str) -> torch.Tensor:
    """What the decoding rules act on: raw logits for the softmax head, the factorised log-probs otherwise."""
    return logits if head == "softmax" else action_log_probs(logits, backtrack_id, head)


def decoding_log_probs(scores: torch.Tensor, config: BacktrackGenerationConfig) -> torch.Tensor:
    """Log-probs [..., V] of the masked ``scores``: ``log_softmax(scores / temperature)`` when sampling (fp32).

    This is the RL convention of ``return_logprobs``: top-k/top-p are not part of it.
    """
    temperature = config.temperature if config.do_sample else 1.0
    return torch.log_softmax(scores.float() / temperature, dim=-1)
