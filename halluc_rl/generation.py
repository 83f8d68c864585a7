"""Backtrack-aware batched generation.

Every action costs one batched one-token forward pass: an appended token is fed; a backtrack rewinds the row's
cache by two tokens (the deleted one and the new last one) and feeds the new last token again, so its logits are
exact without re-encoding the prefix. A row whose response becomes empty reuses the logits saved after the prompt.
With no backtrack fired the loop is a plain cached decode and greedy output equals ``model.generate``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Protocol

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from halluc_rl.backtrack import ActionKind, BatchedBacktrackState, StepEvent, stop_token_ids
from halluc_rl.cache import RewindableCache
from halluc_rl.losses import action_log_probs
from halluc_rl.policy import policy_backtrack


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
    """After a token is deleted this many times at the same position, it may not be typed there again (None: off)."""
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


def _encode_prompts(tokenizer, prompts, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded [B, P] ids and mask from strings, id lists, or a ready BatchEncoding/dict."""
    if isinstance(prompts, dict) or hasattr(prompts, "input_ids"):
        ids, mask = prompts["input_ids"], prompts["attention_mask"]
        return ids.to(device), mask.to(device)
    if not prompts:
        raise ValueError("no prompts given")
    if isinstance(prompts[0], str):
        bos = getattr(tokenizer, "bos_token", None)  # a chat-templated string already starts with it: not twice
        lists = [tokenizer(p, add_special_tokens=not (bos and p.startswith(bos)))["input_ids"] for p in prompts]
    else:
        lists = [list(map(int, p)) for p in prompts]
    if any(len(x) == 0 for x in lists):
        raise ValueError("every prompt needs at least one token")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = max(map(len, lists))
    ids = torch.full((len(lists), width), pad, dtype=torch.long)
    mask = torch.zeros((len(lists), width), dtype=torch.long)
    for b, x in enumerate(lists):
        ids[b, width - len(x) :] = torch.tensor(x)
        mask[b, width - len(x) :] = 1
    return ids.to(device), mask.to(device)


def row_generators(seeds: Sequence[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One seeded generator per row, for batch-invariant sampling (see :func:`generate`)."""
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


class LoopGuard:
    """Bans re-typing a token at a position after it was deleted there ``limit`` times (per row).

    Generation records each step's deletions and asks for the bans of the current states; the scorer replays an
    action stream through the same object, so both mask the same tokens.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.counts: dict[tuple[int, int, int], int] = {}
        self.bans: dict[int, dict[int, list[int]]] = {}  # row -> response length -> banned tokens

    def record(self, kinds: torch.Tensor, deleted: torch.Tensor, lengths: torch.Tensor) -> None:
        """Count this step's deletions: ``kinds``, ``deleted`` and the new ``lengths`` are [B]."""
        rows = torch.nonzero(kinds == int(ActionKind.DELETE)).flatten().tolist()
        for b in rows:
            key = (b, int(lengths[b]), int(deleted[b]))
            self.counts[key] = self.counts.get(key, 0) + 1
            if self.counts[key] == self.limit:
                self.bans.setdefault(b, {}).setdefault(key[1], []).append(key[2])

    def banned(self, lengths: torch.Tensor) -> list[tuple[int, int]]:
        """(row, token) pairs banned at the rows' current response ``lengths`` [B]."""
        out = []
        for b, by_pos in self.bans.items():
            out += [(b, t) for t in by_pos.get(int(lengths[b]), ())]
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


def generate(
    model,
    tokenizer,
    prompts: Sequence[str] | Sequence[Sequence[int]] | dict,
    config: BacktrackGenerationConfig | None = None,
    *,
    backtrack_id: int | None = None,
    forced_actions: torch.Tensor | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    callbacks: Sequence[StepCallback] = (),
    responses: Sequence[Sequence[int]] | None = None,
    num_branches: int = 1,
    **overrides,
) -> BacktrackGenerationOutput:
    """Generate from a batch of prompts with ``<|BACKTRACK|>`` applied on the fly.

    ``forced_actions`` [B, S] (-1 = let the model choose) replaces the model's choice where set: teacher forcing,
    replaying an episode, or benchmarking a fixed backtrack pattern. Keyword ``overrides`` update ``config``.

    ``generator``: one ``torch.Generator`` for the batch, or one per output row. Per-row generators sample each row
    by the Gumbel-max trick from its own stream, so a row's sample does not depend on what else is in the batch:
    the same seeds give the same answers in any batch split (several processes, other batch sizes).

    Branching: ``responses`` gives each row a response already written (a state: its tokens are prefilled with the
    prompt in one forward, and backtracks may delete them); ``num_branches`` K forks every prefilled row into K
    rows (row ``b`` becomes rows ``b*K .. b*K+K-1``) by copying its KV cache, so K continuations of a state cost no
    re-encoding. The outputs have ``B*K`` rows; ``sequences`` include the prefilled response, and the trace holds
    the new actions only. Process-reward followers cannot start from a prefilled response (they are refused).

    Runs under ``torch.inference_mode``; the returned tensors are ordinary copies that trainers may use in autograd.
    """
    with torch.inference_mode():
        out = _generate(model, tokenizer, prompts, config, backtrack_id=backtrack_id, forced_actions=forced_actions,
                        generator=generator, callbacks=callbacks, responses=responses, num_branches=num_branches,
                        **overrides)
    for name in ("actions", "kinds", "deleted", "positions", "num_backtracks", "num_deleted", "num_failed", "finished",
                 "logprobs"):
        value = getattr(out, name)
        if value is not None:
            setattr(out, name, value.clone())  # inference tensors cannot be saved for backward; copies can
    return out


def _generate(model, tokenizer, prompts, config, *, backtrack_id, forced_actions, generator, callbacks, responses,
              num_branches, **overrides):
    unknown = set(overrides) - {f.name for f in fields(BacktrackGenerationConfig)}
    if unknown:
        raise TypeError(f"unknown generation option(s): {sorted(unknown)}; see BacktrackGenerationConfig")
    config = replace(config or BacktrackGenerationConfig(), **overrides)
    bt, head = policy_backtrack(model, backtrack_id)
    vocab_rows = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None else None
    if vocab_rows is not None and bt >= vocab_rows:
        raise ValueError(
            f"backtrack id {bt} is outside the model's vocabulary ({vocab_rows} rows); call "
            "halluc_rl.modeling.add_backtrack_token(model, tokenizer) to resize the embeddings"
        )
    device = next(model.parameters()).device
    input_ids, attention_mask = _encode_prompts(tokenizer, prompts, device)
    prefix = None
    if responses is not None:
        if callbacks:
            raise NotImplementedError("reward followers cannot start from a prefilled response; score such "
                                      "continuations with outcome rewards (halluc_rl.values.mc_values)")
        if len(responses) != input_ids.shape[0]:
            raise ValueError(f"{len(responses)} responses for {input_ids.shape[0]} prompts")
        prefix = [list(map(int, r)) for r in responses]
        rows = [input_ids[b][attention_mask[b].bool()].tolist() + prefix[b] for b in range(len(prefix))]
        input_ids, attention_mask = _encode_prompts(tokenizer, rows, device)
    if num_branches < 1:
        raise ValueError(f"num_branches must be >= 1, got {num_branches}")
    batch = input_ids.shape[0] * num_branches
    stop_ids = stop_token_ids(tokenizer, getattr(model, "generation_config", None), config.eos_token_id)
    eos_ids = torch.tensor(stop_ids, dtype=torch.long, device=device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if forced_actions is not None:
        forced_actions = forced_actions.to(device)
        if forced_actions.shape[0] != batch:
            raise ValueError(f"forced_actions has {forced_actions.shape[0]} rows for {batch} prompts")
    if isinstance(generator, (list, tuple)) and len(generator) != batch:
        raise ValueError(f"{len(generator)} generators for {batch} rows: give one per row (or one for the batch)")

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
    guard = LoopGuard(config.loop_guard) if config.loop_guard else None
    max_stop = max((len(s) for s in config.stop_strings), default=0)

    was_training = model.training
    model.eval()
    try:
        out = _decode(model, tokenizer, config, bt, head, input_ids, attention_mask, eos_ids, pad, max_stop,
                      warpers, guard, forced_actions, generator, callbacks, device, prefix, num_branches)
    finally:
        if was_training:
            model.train()
    out.config, out.backtrack_id, out.backtrack_head = config, bt, head
    return out


def _decode(model, tokenizer, config, bt, head, input_ids, attention_mask, eos_ids, pad, max_stop, warpers, guard,
            forced_actions, generator, callbacks, device, prefix=None, branches=1) -> BacktrackGenerationOutput:
    """The decoding loop itself (see :func:`generate`)."""
    steps = int(config.max_new_tokens)
    rc = RewindableCache(model, compact_min_holes=config.compact_min_holes)
    written = None if prefix is None else torch.tensor([len(r) for r in prefix], device=device)  # [B0]
    logits = rc.prefill(input_ids, attention_mask, written)  # [B0, V]
    if branches > 1:
        rc.fork(branches)
        logits = logits.repeat_interleave(branches, dim=0)  # [B, V]
        input_ids = input_ids.repeat_interleave(branches, dim=0)  # [B, P]
        attention_mask = attention_mask.repeat_interleave(branches, dim=0)  # [B, P]
        prefix = None if prefix is None else [r for r in prefix for _ in range(branches)]
    batch = input_ids.shape[0]
    for cb in callbacks:
        cb.on_prefill(input_ids, attention_mask)
    state = BatchedBacktrackState(batch, steps + max((len(r) for r in prefix or ()), default=0), bt, device)
    if prefix is not None:
        state.load(prefix)
    active = torch.ones(batch, dtype=torch.bool, device=device)  # [B]
    finished = torch.zeros(batch, dtype=torch.bool, device=device)  # [B]
    # step-major trace buffers [S, B]: one contiguous copy per step, transposed once at the end
    t_actions, t_kinds, t_deleted, t_len = (torch.full((steps, batch), -1, dtype=torch.long, device=device)
                                            for _ in range(4))
    t_logp = torch.zeros(steps, batch, device=device) if config.return_logprobs else None
    fill = torch.full((batch,), pad, dtype=torch.long, device=device)
    single_eos = int(eos_ids[0]) if eos_ids.numel() == 1 else None
    all_active = True
    ran = 0
    for step in range(steps):
        ran = step + 1
        # [B, V] a fresh tensor each step (or a copy of the prompt logits): safe to edit in place
        scores = decoding_scores(logits, bt, head)
        bans = None
        if guard is not None and guard.bans:
            pairs = guard.banned(state.lengths)
            if pairs:
                bans = tuple(torch.tensor(list(col), device=device) for col in zip(*pairs))  # (rows, tokens)
        mask_scores(scores, bt, config, state.lengths, state.num_backtracks, bans)
        if config.do_sample and isinstance(generator, (list, tuple)):
            warped = warpers(state.ids, scores.float())  # [B, V] fp32
            noise = torch.stack([torch.rand(warped.shape[1], generator=g, device=device) for g in generator])  # [B, V]
            action = (warped - torch.log(-torch.log(noise.clamp(1e-20, 1 - 1e-7)))).argmax(-1)  # [B] Gumbel-max
        elif config.do_sample:
            probs = torch.softmax(warpers(state.ids, scores.float()), dim=-1)  # [B, V] in fp32, even for bf16 models
            action = torch.multinomial(probs, 1, generator=generator).squeeze(1)  # [B]
        else:
            action = scores.argmax(-1)  # [B]
        if forced_actions is not None and step < forced_actions.shape[1]:
            action = torch.where(forced_actions[:, step] >= 0, forced_actions[:, step], action)
        if t_logp is not None:
            logp = decoding_log_probs(scores, config)  # [B, V]
            t_logp[step] = logp.gather(1, action.unsqueeze(1)).squeeze(1)
        if not all_active:
            action = torch.where(active, action, fill)
        t_len[step] = state.lengths
        kinds, deleted = state.step(action, None if all_active else active)
        t_actions[step], t_kinds[step], t_deleted[step] = action, kinds, deleted
        if guard is not None:
            guard.record(kinds, deleted, state.lengths)

        for cb in callbacks:
            cb.on_step(StepEvent(step, action, kinds, deleted, kinds >= 0, state))
        appended = kinds == int(ActionKind.APPEND)  # [B]
        if single_eos is not None:
            done = appended & (action == single_eos)  # [B]
        elif eos_ids.numel():
            done = appended & torch.isin(action, eos_ids)  # [B]
        else:
            done = torch.zeros_like(appended)
        if max_stop:
            for b in torch.nonzero(appended & ~done).flatten().tolist():
                n = int(state.lengths[b])
                tail = tokenizer.decode(state.ids[b, max(0, n - max_stop - 8) : n].tolist())
                done[b] = any(tail.endswith(s) for s in config.stop_strings)
        if bool(done.any()):
            finished |= done
            active &= ~done
            all_active = False
            if not bool(active.any()):
                break
        if step == steps - 1:
            break

        if all_active and bool(appended.all()):  # the common step: every row appended, nothing to rewind
            logits = rc.step(action)
        else:
            logits = rc.follow(state.lengths, state.last_tokens(fill), active)

    kinds_bs = t_kinds[:ran].T  # [B, S]
    lengths_bs = t_len[:ran].T  # [B, S] response length before each action
    positions = torch.where(kinds_bs == int(ActionKind.APPEND), lengths_bs,
                            torch.where(kinds_bs == int(ActionKind.DELETE), lengths_bs - 1, 0))
    positions = torch.where(kinds_bs >= 0, positions, -1)
    sequences = [state.visible(b) for b in range(batch)]
    texts = tokenizer.batch_decode(sequences, skip_special_tokens=True)
    prompt_ids = [input_ids[b][attention_mask[b].bool()].tolist() for b in range(batch)]
    if prefix is not None:  # the prompts without the prefilled responses
        prompt_ids = [ids[: len(ids) - len(prefix[b])] for b, ids in enumerate(prompt_ids)]
    return BacktrackGenerationOutput(
        sequences=sequences,
        texts=texts,
        actions=torch.where(kinds_bs >= 0, t_actions[:ran].T, -1),
        kinds=kinds_bs,
        deleted=t_deleted[:ran].T,
        positions=positions,
        num_backtracks=state.num_backtracks,
        num_deleted=state.num_deleted,
        num_failed=state.num_failed,
        finished=finished,
        logprobs=None if t_logp is None else t_logp[:ran].T,
        prompt_ids=prompt_ids,
    )
