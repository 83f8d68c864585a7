"""The decoding engine: one object that steps a batch of rows, one action per row per step.

:class:`DecodeEngine` holds everything the loop needs - the :class:`~halluc_rl.cache.RewindableCache`, the
:class:`~halluc_rl.backtrack.BatchedBacktrackState`, the :class:`~halluc_rl.decoding.LoopGuard`, the sampling
warpers, the episode-end rule (:class:`~halluc_rl.backtrack.EpisodeEnd`), forced actions, generators, callbacks
and the trace - and each step is a few named moves: score the states, choose the actions, apply them, check the
stop, advance the cache. :func:`halluc_rl.generation.generate` validates its inputs, builds an engine and runs it.

What the model's context is after an action is one swappable part, a :class:`DecodingSemantics` chosen by name
(:data:`DECODERS`, one per :data:`halluc_rl.backtrack.SEMANTICS`). ``"rewind"`` (:class:`RewindDecoding`, the
default): a backspace rewinds the cache, so every action is chosen from the visible text alone. ``"retry"``
(:class:`RetryDecoding`): every action is fed, backtracks included, so the cache only appends.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from halluc_rl.backtrack import ActionKind, BatchedBacktrackState, EpisodeEnd, StepEvent, apply_actions
from halluc_rl.cache import RewindableCache
from halluc_rl.decoding import (
    BacktrackGenerationConfig,
    BacktrackGenerationOutput,
    LoopGuard,
    StepCallback,
    decoding_log_probs,
    decoding_scores,
    mask_scores,
)


class DecodingSemantics(Protocol):
    """What the model is fed: the interface a backtrack semantics implements for :class:`DecodeEngine`.

    ``prefill`` encodes the left-padded prompts [B, P] (the last ``written`` [B] tokens of each row are a response
    already written, or ``written`` is None) and returns the next-token logits [B, V]. ``advance`` brings the
    cache in line with ``state`` after a step's ``actions`` [B] (with :class:`ActionKind` codes ``kinds`` [B]) and
    returns the next-token logits [B, V]; ``active`` [B] marks the rows still decoding, or is None while every row
    is (the engine keeps that flag in Python, so the common step costs no extra sync). Finished rows' logits are
    never read. A semantics never changes the visible text: that is :class:`BatchedBacktrackState`'s rule.
    """

    name: str

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                written: torch.Tensor | None) -> torch.Tensor: ...

    def advance(self, actions: torch.Tensor, kinds: torch.Tensor, state: BatchedBacktrackState,
                active: torch.Tensor | None) -> torch.Tensor: ...


class RewindDecoding:
    """``"rewind"``: the cache holds the visible text only. An append feeds the token; a backspace rewinds the row
    (:meth:`RewindableCache.follow`), so after it the model is exactly where it was before typing the deleted
    token. When every row appended, the step is a plain cached decode (:meth:`RewindableCache.step`)."""

    name = "rewind"

    def __init__(self, cache: RewindableCache, pad: int):
        self.cache = cache
        self.pad = pad
        self._fill: torch.Tensor | None = None  # [B] the token an empty or finished row stands on

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                written: torch.Tensor | None) -> torch.Tensor:
        """Encode the prompts (and prefilled responses): next-token logits [B, V]."""
        return self.cache.prefill(input_ids, attention_mask, written)

    def advance(self, actions: torch.Tensor, kinds: torch.Tensor, state: BatchedBacktrackState,
                active: torch.Tensor | None) -> torch.Tensor:
        """Feed the appended tokens, or rewind the rows that deleted: next-token logits [B, V]."""
        if active is None and bool((kinds == int(ActionKind.APPEND)).all()):  # the common step: nothing to rewind
            return self.cache.step(actions)
        if self._fill is None or self._fill.shape != actions.shape:
            self._fill = torch.full_like(actions, self.pad)  # [B]
        return self.cache.follow(state.lengths, state.last_tokens(self._fill), active)


class RetryDecoding:
    """``"retry"``: the cache holds every action, in order. Each action is fed as a token, a backtrack too (the
    deleted tokens stay in the context), so every step is a plain cached decode: nothing is ever cropped or
    compacted. A finished row is fed the pad token; its logits are never read."""

    name = "retry"

    def __init__(self, cache: RewindableCache, pad: int):
        self.cache = cache
        self.pad = pad

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                written: torch.Tensor | None) -> torch.Tensor:
        """Encode the prompts (each followed by the actions already taken): next-token logits [B, V]."""
        return self.cache.prefill(input_ids, attention_mask, written)

    def advance(self, actions: torch.Tensor, kinds: torch.Tensor, state: BatchedBacktrackState,
                active: torch.Tensor | None) -> torch.Tensor:
        """Feed every row's action, a backtrack included: next-token logits [B, V]."""
        return self.cache.step(actions)


DECODERS: dict[str, type] = {"rewind": RewindDecoding, "retry": RetryDecoding}
"""The decoder of each semantics by name: each class takes ``(cache, pad)`` and implements
:class:`DecodingSemantics`."""


def decoding_semantics(name: str, cache: RewindableCache, pad: int) -> DecodingSemantics:
    """The semantics called ``name`` over ``cache`` (see :data:`DECODERS`)."""
    if name not in DECODERS:
        raise ValueError(f"semantics: unknown value {name!r}; use one of {', '.join(sorted(DECODERS))}")
    return DECODERS[name](cache, pad)


def sampling_warpers(config: BacktrackGenerationConfig) -> LogitsProcessorList:
    """transformers' warpers for ``config``'s temperature, top-k and top-p (empty when greedy)."""
    warpers = LogitsProcessorList()
    if config.do_sample:
        if config.temperature <= 0:
            raise ValueError("temperature must be > 0 when sampling; use do_sample=False for greedy decoding")
        if config.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(config.temperature))
        if config.top_k:
            warpers.append(TopKLogitsWarper(config.top_k))
        if config.top_p < 1.0:
            warpers.append(TopPLogitsWarper(config.top_p))
    return warpers


class DecodeEngine:
    """Backtrack-aware decoding of a batch: ``start()`` once, ``step()`` until it returns False, then ``output()``.

    ``run()`` does all three. ``generator`` is one ``torch.Generator`` for the batch or one per row (Gumbel-max
    sampling per row, batch-invariant); ``forced_actions`` [B, S] (-1: the model chooses) overrides the choice.
    """

    def __init__(self, model, tokenizer, config: BacktrackGenerationConfig, *, backtrack_id: int, head: str,
                 end: EpisodeEnd, pad: int, forced_actions: torch.Tensor | None = None,
                 generator: torch.Generator | Sequence[torch.Generator] | None = None,
                 callbacks: Sequence[StepCallback] = (), semantics: str = "rewind"):
        self.tokenizer, self.config, self.bt, self.head, self.end = tokenizer, config, backtrack_id, head, end
        self.forced, self.generator, self.callbacks = forced_actions, generator, callbacks
        self.per_row = config.do_sample and isinstance(generator, (list, tuple))
        self.warpers = sampling_warpers(config)
        self.guard = LoopGuard(config.loop_guard) if config.loop_guard else None
        self.cache = RewindableCache(model, compact_min_holes=config.compact_min_holes)
        self.semantics = decoding_semantics(semantics, self.cache, pad)
        self.pad = pad
        self.device = next(model.parameters()).device

    # -- setup -----------------------------------------------------------------------------------------------
    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              prefix: list[list[int]] | None = None, branches: int = 1) -> None:
        """Prefill left-padded prompts [B0, P] (each followed by its ``prefix`` response, if given), fork every
        row into ``branches`` rows, and set up the state and the trace buffers."""
        written = None if prefix is None else torch.tensor([len(r) for r in prefix], device=self.device)  # [B0]
        logits = self.semantics.prefill(input_ids, attention_mask, written)  # [B0, V]
        if branches > 1:
            self.cache.fork(branches)
            logits = logits.repeat_interleave(branches, dim=0)  # [B, V]
            input_ids = input_ids.repeat_interleave(branches, dim=0)  # [B, P]
            attention_mask = attention_mask.repeat_interleave(branches, dim=0)  # [B, P]
            prefix = None if prefix is None else [r for r in prefix for _ in range(branches)]
        self.logits, self.input_ids, self.attention_mask, self.prefix = logits, input_ids, attention_mask, prefix
        batch = input_ids.shape[0]
        for cb in self.callbacks:
            cb.on_prefill(input_ids, attention_mask)
        steps = self.steps = int(self.config.max_new_tokens)
        self.state = BatchedBacktrackState(batch, steps + max((len(r) for r in prefix or ()), default=0), self.bt,
                                           self.device)
        if prefix is not None:  # in retry a prefix is an action stream: the state starts from its visible text
            self.state.load(prefix if self.semantics.name == "rewind" else
                            [apply_actions(r, self.bt).visible_ids for r in prefix])
        self.active = torch.ones(batch, dtype=torch.bool, device=self.device)  # [B]
        self.finished = torch.zeros(batch, dtype=torch.bool, device=self.device)  # [B]
        # step-major trace buffers [S, B]: one contiguous copy per step, transposed once at the end
        self.t_actions, self.t_kinds, self.t_deleted, self.t_len = (
            torch.full((steps, batch), -1, dtype=torch.long, device=self.device) for _ in range(4))
        self.t_logp = torch.zeros(steps, batch, device=self.device) if self.config.return_logprobs else None
        self.fill = torch.full((batch,), self.pad, dtype=torch.long, device=self.device)  # [B]
        self.all_active = True  # no row has finished: kept in Python, no sync per step
        self.ran = 0

    # -- one step --------------------------------------------------------------------------------------------
    def step(self) -> bool:
        """Take one action in every active row. Returns whether decoding goes on."""
        step = self.ran
        if step >= self.steps:
            return False
        self.ran = step + 1
        scores = self._scores()  # [B, V]
        action = self._choose(scores, step)  # [B]
        kinds = self._apply(action, step)  # [B]
        if self._check_stop(action, kinds) or self.end.truncated(self.ran):
            return False
        self.logits = self.semantics.advance(action, kinds, self.state, None if self.all_active else self.active)
        return True

    def _scores(self) -> torch.Tensor:
        """The current logits with the decoding rules applied: [B, V], a fresh tensor safe to edit in place."""
        scores = decoding_scores(self.logits, self.bt, self.head)  # [B, V]
        bans = None
        if self.guard is not None and self.guard.bans:
            pairs = self.guard.banned(self.state)
            if pairs:
                bans = tuple(torch.tensor(list(col), device=self.device) for col in zip(*pairs))  # (rows, tokens)
        return mask_scores(scores, self.bt, self.config, self.state.lengths, self.state.num_backtracks, bans)

    def _choose(self, scores: torch.Tensor, step: int) -> torch.Tensor:
        """Each row's action [B]: sampled, argmax or forced; its log-prob goes to the trace."""
        if self.per_row:
            warped = self.warpers(self.state.ids, scores.float())  # [B, V] fp32
            noise = torch.stack([torch.rand(warped.shape[1], generator=g, device=self.device)
                                 for g in self.generator])  # [B, V]
            action = (warped - torch.log(-torch.log(noise.clamp(1e-20, 1 - 1e-7)))).argmax(-1)  # [B] Gumbel-max
        elif self.config.do_sample:
            probs = torch.softmax(self.warpers(self.state.ids, scores.float()), dim=-1)  # [B, V] fp32, even for bf16
            action = torch.multinomial(probs, 1, generator=self.generator).squeeze(1)  # [B]
        else:
            action = scores.argmax(-1)  # [B]
        if self.forced is not None and step < self.forced.shape[1]:
            action = torch.where(self.forced[:, step] >= 0, self.forced[:, step], action)  # [B]
        if self.t_logp is not None:
            logp = decoding_log_probs(scores, self.config)  # [B, V]
            self.t_logp[step] = logp.gather(1, action.unsqueeze(1)).squeeze(1)
        return action if self.all_active else torch.where(self.active, action, self.fill)  # [B]

    def _apply(self, action: torch.Tensor, step: int) -> torch.Tensor:
        """Apply ``action`` [B] to the state, record it, tell the guard and the callbacks. Returns the kinds [B]."""
        self.t_len[step] = self.state.lengths
        kinds, deleted = self.state.step(action, None if self.all_active else self.active)  # [B], [B]
        self.t_actions[step], self.t_kinds[step], self.t_deleted[step] = action, kinds, deleted
        if self.guard is not None:
            self.guard.record(kinds, deleted, self.state)
        for cb in self.callbacks:
            cb.on_step(StepEvent(step, action, kinds, deleted, kinds >= 0, self.state, self.semantics.name))
        return kinds

    def _check_stop(self, action: torch.Tensor, kinds: torch.Tensor) -> bool:
        """Finish the rows whose action ended their episode. Returns whether every row is done."""
        done = self.end.terminated(action, kinds, self.state)  # [B]
        if bool(done.any()):
            self.finished |= done
            self.active &= ~done
            self.all_active = False
            return not bool(self.active.any())
        return False

    # -- results ---------------------------------------------------------------------------------------------
    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prefix: list[list[int]] | None = None,
            branches: int = 1) -> BacktrackGenerationOutput:
        """Decode to the end (see :meth:`start`) and return the output."""
        self.start(input_ids, attention_mask, prefix, branches)
        while self.step():
            pass
        return self.output()

    def output(self) -> BacktrackGenerationOutput:
        """The visible results and the [B, S] trace of the steps run (S = steps run)."""
        ran, state = self.ran, self.state
        kinds_bs = self.t_kinds[:ran].T  # [B, S]
        lengths_bs = self.t_len[:ran].T  # [B, S] response length before each action
        positions = torch.where(kinds_bs == int(ActionKind.APPEND), lengths_bs,
                                torch.where(kinds_bs == int(ActionKind.DELETE), lengths_bs - 1, 0))  # [B, S]
        positions = torch.where(kinds_bs >= 0, positions, -1)  # [B, S]
        batch = self.input_ids.shape[0]
        sequences = [state.visible(b) for b in range(batch)]
        prompt_ids = [self.input_ids[b][self.attention_mask[b].bool()].tolist() for b in range(batch)]
        if self.prefix is not None:  # the prompts without the prefilled responses
            prompt_ids = [ids[: len(ids) - len(self.prefix[b])] for b, ids in enumerate(prompt_ids)]
        return BacktrackGenerationOutput(
            sequences=sequences,
            texts=self.tokenizer.batch_decode(sequences, skip_special_tokens=True),
            actions=torch.where(kinds_bs >= 0, self.t_actions[:ran].T, -1),
            kinds=kinds_bs,
            deleted=self.t_deleted[:ran].T,
            positions=positions,
            num_backtracks=state.num_backtracks,
            num_deleted=state.num_deleted,
            num_failed=state.num_failed,
            finished=self.finished,
            logprobs=None if self.t_logp is None else self.t_logp[:ran].T,
            prompt_ids=prompt_ids,
        )
