"""Log-probabilities of action streams: the one scorer every trainer uses (SFT's collator, DPO, the PRMs, PPO).

An action stream is a prompt and the actions a policy took, backtracks included (``Rollout.actions``: [B, S], -1
after the end). What each action was chosen from depends on the policy's semantics
(:data:`halluc_rl.backtrack.SEMANTICS`). The scorer reproduces it in one batched forward with gradients:

* **one packing per semantics** (:func:`pack_streams`). In ``rewind`` generation rewinds its KV cache on every
  backspace, so each action was chosen from the *visible* text alone: each stream is replayed with the backtrack
  stack (:func:`halluc_rl.backtrack.rewind_layout`), typed tokens are packed flat, each at its visible position and
  attending to its chain of visible ancestors only (a 4D mask), so a correction typed after a backtrack never
  attends to the deleted token, and backtrack tokens are never inputs. In ``retry`` every action stays in the
  context, so the stream is one causal sequence with the backtrack tokens as inputs
  (:func:`halluc_rl.backtrack.retry_layout`). The masked-error collator lays out SFT batches with the same
  function;
* **the same decoding rules** (:func:`halluc_rl.decoding.mask_scores`): the policy's head, the backtrack bias,
  the budget, the empty-response mask, the loop guard's bans and the temperature are applied to each action's
  logits exactly as generation applied them when it sampled. A state's rule inputs (response length, backtracks so
  far, bans) come from replaying the stream through the decoder's own state objects.

The contract is exactness: the log-probs equal the rollout's sampling log-probs in both semantics (fp32, tested
to 1e-5 on Llama, Qwen2, GPT-2 and sliding-window models, under LoRA), so the first PPO ratio is exactly 1. Top-k/top-p are not part of the log-prob (the RL
convention ``return_logprobs`` follows too): sample with ``top_k=0, top_p=1`` for exact ratios.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from halluc_rl.backtrack import BatchedBacktrackState, RewindLayout, ancestor_mask, stream_layout
from halluc_rl.generation import (
    BacktrackGenerationConfig,
    LoopGuard,
    decoding_log_probs,
    decoding_scores,
    mask_scores,
)
from halluc_rl.losses import IGNORE_INDEX
from halluc_rl.policy import policy_backtrack, policy_semantics

# ----------------------------------------------------------------------------------------------------------------
# The one packing
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class PackedStreams:
    """Action streams laid out for one teacher-forced forward that sees what generation saw."""

    input_ids: torch.Tensor  # [B, L] typed tokens: prompt, appended actions (never a backtrack); pad after
    position_ids: torch.Tensor  # [B, L] visible position of each token when it was typed
    attention_mask: torch.Tensor  # [B, 1, L, L] a token sees its visible ancestors and itself (bool or additive)
    labels: torch.Tensor  # [B, L] trained actions in the Hugging Face shifted layout, -100 elsewhere
    predictors: torch.Tensor  # [B, S] flat index of the state each response action was taken from; -1 padding


def pack_streams(
    streams: Sequence[Sequence[int]],
    prompt_lengths: Sequence[int],
    backtrack_id: int,
    trained: Sequence[Sequence[bool]] | None = None,
    *,
    pad_id: int = 0,
    pad_to_multiple_of: int | None = None,
    num_actions: int | None = None,
    mask_dtype: torch.dtype = torch.bool,
    semantics: str = "rewind",
) -> PackedStreams:
    """Pack ``streams`` (prompt ids then the response's actions, one list per row) in the layout of ``semantics``.

    ``trained[b][k]`` marks the actions that get a label (None: every response action). ``num_actions`` sets S of
    ``predictors`` (default: the longest response). ``rewind`` gives the 4D ancestor mask: ``mask_dtype`` bool gives
    True = attend; a float dtype gives an additive mask (0 / the dtype's minimum), which eager and SDPA attention
    both take. ``retry`` gives plain causal sequences, right-padded, with a 2D mask (1 = a real token): the fast,
    mask-free attention path.
    """
    layouts = [stream_layout(semantics, s, None if trained is None else trained[b], backtrack_id, prompt_lengths[b],
                             IGNORE_INDEX, pad_id) for b, s in enumerate(streams)]
    if semantics == "retry":
        return _pack_causal(layouts, pad_id, pad_to_multiple_of, num_actions)
    batch = len(layouts)
    longest = max(len(lay.input_ids) for lay in layouts)
    width = longest if not pad_to_multiple_of else -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    steps = max((len(lay.predictors) for lay in layouts), default=0) if num_actions is None else num_actions
    input_ids = np.full((batch, width), pad_id, dtype=np.int64)  # [B, L]
    labels = np.full((batch, width), IGNORE_INDEX, dtype=np.int64)  # [B, L]
    positions = np.zeros((batch, width), dtype=np.int64)  # [B, L]
    predictors = np.full((batch, steps), -1, dtype=np.int64)  # [B, S]
    allowed = np.zeros((batch, width, width), dtype=bool)  # [B, L, L]
    allowed[:, np.arange(width), np.arange(width)] = True  # padding sees itself
    for b, lay in enumerate(layouts):
        n = len(lay.input_ids)
        input_ids[b, :n] = lay.input_ids
        labels[b, :n] = lay.labels
        positions[b, :n] = lay.position_ids
        positions[b, n:] = np.arange(lay.position_ids[-1] + 1, lay.position_ids[-1] + 1 + width - n)
        allowed[b, :n, :n] = ancestor_mask(lay.parents)  # [n, n]
        predictors[b, : len(lay.predictors)] = lay.predictors[:steps]
    mask = as_attention_mask(torch.from_numpy(allowed).unsqueeze(1), mask_dtype)  # [B, 1, L, L]
    return PackedStreams(torch.from_numpy(input_ids), torch.from_numpy(positions), mask,
                         torch.from_numpy(labels), torch.from_numpy(predictors))


def _pack_causal(layouts: Sequence[RewindLayout], pad_id: int, pad_to_multiple_of: int | None,
                 num_actions: int | None) -> PackedStreams:
    """Causal layouts (:func:`halluc_rl.backtrack.retry_layout`) right-padded, with a 2D mask [B, L]."""
    longest = max(len(lay.input_ids) for lay in layouts)
    width = longest if not pad_to_multiple_of else -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    steps = max((len(lay.predictors) for lay in layouts), default=0) if num_actions is None else num_actions
    ids = torch.full((len(layouts), width), pad_id, dtype=torch.long)  # [B, L]
    labels = torch.full((len(layouts), width), IGNORE_INDEX, dtype=torch.long)  # [B, L]
    mask = torch.zeros_like(ids)  # [B, L]
    predictors = torch.full((len(layouts), steps), -1, dtype=torch.long)  # [B, S]
    for b, lay in enumerate(layouts):
        n = len(lay.input_ids)
        ids[b, :n] = torch.tensor(lay.input_ids)
        labels[b, :n] = torch.tensor(lay.labels)
        mask[b, :n] = 1
        predictors[b, : len(lay.predictors)] = torch.tensor(lay.predictors[:steps], dtype=torch.long)
    positions = torch.arange(width).expand(len(layouts), width).clone()  # [B, L]
    return PackedStreams(ids, positions, mask, labels, predictors)


def causal_streams(streams: Sequence[Sequence[int]], prompt_lengths: Sequence[int], num_actions: int,
                   pad_id: int = 0) -> PackedStreams:
    """Streams as plain causal sequences, right-padded, with a 2D mask (1 = a real token): the ``retry`` packing,
    and what :func:`pack_streams` gives in ``rewind`` for streams without a backtrack (with a 4D mask there)."""
    return pack_streams(streams, prompt_lengths, -1, pad_id=pad_id, num_actions=num_actions, semantics="retry")


def as_attention_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (True = attend) as ``dtype``: itself for bool, else additive (0 / the dtype's minimum)."""
    if dtype == torch.bool:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


def windowed(allowed: torch.Tensor, position_ids: torch.Tensor, window: int) -> torch.Tensor:
    """``allowed`` [B, 1, L, L] (bool) restricted to keys fewer than ``window`` visible positions back: what a
    sliding-window layer sees (ancestors sit at distinct positions, so this counts visible tokens)."""
    gap = position_ids.unsqueeze(2) - position_ids.unsqueeze(1)  # [B, L, L] query position - key position
    return allowed & (gap < window).unsqueeze(1)


# ----------------------------------------------------------------------------------------------------------------
# The decoder's state, replayed
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class DecodeContext:
    """What the decoding rules read at the state before each action, replayed from an action stream."""

    lengths: torch.Tensor  # [B, S] visible response length before the action
    num_backtracks: torch.Tensor  # [B, S] backtracks taken before it
    bans: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (rows, steps, tokens) the loop guard banned there
    mask: torch.Tensor  # [B, S] true where an action was taken


def decode_context(actions: torch.Tensor, backtrack_id: int, config: BacktrackGenerationConfig) -> DecodeContext:
    """Replay ``actions`` [B, S] (-1 padding) through the decoder's own state objects (no model)."""
    actions = actions.cpu()
    batch, steps = actions.shape
    state = BatchedBacktrackState(batch, max(steps, 1), backtrack_id)
    guard = LoopGuard(config.loop_guard) if config.loop_guard else None
    lengths = torch.zeros(batch, steps, dtype=torch.long)  # [B, S]
    spent = torch.zeros(batch, steps, dtype=torch.long)  # [B, S]
    bans: list[tuple[int, int, int]] = []
    mask = actions >= 0  # [B, S]
    for s in range(steps):
        lengths[:, s] = state.lengths
        spent[:, s] = state.num_backtracks
        if guard is not None and guard.bans:
            bans += [(b, s, t) for b, t in guard.banned(state)]
        kinds, deleted = state.step(actions[:, s].clamp(min=0), mask[:, s])
        if guard is not None:
            guard.record(kinds, deleted, state)
    rows, cols, toks = (torch.tensor(list(c), dtype=torch.long) for c in zip(*bans)) if bans else (
        torch.zeros(0, dtype=torch.long) for _ in range(3))
    return DecodeContext(lengths, spent, (rows, cols, toks), mask)


# ----------------------------------------------------------------------------------------------------------------
# The scorer
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ActionScores:
    """Per-action results of :func:`score_actions` ([B, S], zero where ``mask`` is false)."""

    logprobs: torch.Tensor  # [B, S] log-prob of each action under the decoding distribution
    entropy: torch.Tensor  # [B, S] entropy of that distribution at the action's state
    mask: torch.Tensor  # [B, S] true where an action was taken
    hidden: torch.Tensor | None = None  # [B, S, H] final hidden state at the action's state (for value heads)
    top1: torch.Tensor | None = None  # [B, S] the action was the most likely one there
    mean_logit: torch.Tensor | None = None  # [B, S] mean raw logit at the action's state (a drift diagnostic)


def _attention_masks(config, allowed: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype):
    """The packed mask as the model takes it: windowed for sliding-window layers, and a mapping by layer kind for
    models that mix kinds (Gemma-2), which transformers passes to each layer as it is."""
    window = getattr(config, "sliding_window", None)
    kinds = set(getattr(config, "layer_types", None) or [])
    if window is None or (kinds and "sliding_attention" not in kinds):
        return as_attention_mask(allowed, dtype)
    sliding = as_attention_mask(windowed(allowed, position_ids, int(window)), dtype)
    if kinds and kinds != {"sliding_attention"}:
        return {kind: sliding if kind == "sliding_attention" else as_attention_mask(allowed, dtype) for kind in kinds}
    return sliding


def score_actions(
    model,
    prompt_ids: Sequence[Sequence[int]],
    actions: torch.Tensor,
    config: BacktrackGenerationConfig | None = None,
    *,
    backtrack_id: int | None = None,
    return_hidden: bool = False,
    with_entropy: bool = True,
    semantics: str | None = None,
    override_semantics: bool = False,
    **overrides,
) -> ActionScores:
    """Log-probs [B, S] of ``actions`` (-1 padding) after ``prompt_ids``, from one batched forward with gradients.

    ``config`` (and keyword ``overrides``) are the decoding options the actions were sampled with: pass
    ``rollout.generation.config`` to reproduce a rollout's log-probs exactly. The backtrack id and head are read
    from ``model.config``. Run the model in eval mode (no dropout) where the ratio to old log-probs must be exact.
    ``with_entropy=False`` skips the entropy and diagnostics (a reference pass needs the log-probs only).
    ``semantics`` is what the actions were taken in (default: the policy's, :func:`~halluc_rl.policy.policy_semantics`).
    """
    config = replace(config or BacktrackGenerationConfig(), **overrides)
    inner = getattr(model, "module", model)  # a DistributedDataParallel wrapper keeps the model as .module
    bt, head = policy_backtrack(inner, backtrack_id)
    semantics = policy_semantics(inner, semantics, override_semantics)
    if actions.ndim != 2 or actions.shape[0] != len(prompt_ids):
        raise ValueError(f"actions must be [B, S] with B = {len(prompt_ids)} prompts, got {tuple(actions.shape)}")
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("every prompt needs at least one token to predict the first action from")
    device = next(inner.parameters()).device
    cpu_actions = actions.detach().cpu()
    batch, steps = cpu_actions.shape
    context = decode_context(cpu_actions, bt, config)
    streams = [list(map(int, prompt_ids[b])) + cpu_actions[b][context.mask[b]].tolist() for b in range(batch)]
    dtype = next(inner.parameters()).dtype
    if semantics == "rewind" and bool((cpu_actions[context.mask] == bt).any()):  # the rewind layout, 4D mask
        packed = pack_streams(streams, [len(p) for p in prompt_ids], bt, num_actions=steps)
        attention = _attention_masks(inner.config, packed.attention_mask, packed.position_ids,
                                     dtype if dtype.is_floating_point else torch.float32)
        attention = ({kind: m.to(device) for kind, m in attention.items()} if isinstance(attention, dict)
                     else attention.to(device))
    else:  # retry, or no backtrack anywhere: each stream is a plain causal sequence (the fast attention path)
        packed = causal_streams(streams, [len(p) for p in prompt_ids], steps)
        attention = packed.attention_mask.to(device)
    # logits are needed from the last prompt token on: keep only that tail (the prompt's other logits are waste)
    width = packed.input_ids.shape[1]
    keep = width - (min(len(p) for p in prompt_ids) - 1)
    kwargs = {"logits_to_keep": keep} if _accepts_logits_to_keep(inner) else {}
    offset = width - keep if kwargs else 0
    out = model(input_ids=packed.input_ids.to(device), attention_mask=attention,
                position_ids=packed.position_ids.to(device), use_cache=False, output_hidden_states=return_hidden,
                **kwargs)
    rows = torch.arange(batch, device=device).unsqueeze(1)  # [B, 1]
    where = packed.predictors.to(device)  # [B, S] -1 where there is no action
    logits = out.logits[rows, (where - offset).clamp(min=0)]  # [B, S, V]
    mask = context.mask.to(device)  # [B, S]
    scores = decoding_scores(logits, bt, head)  # [B, S, V]
    bans = tuple(t.to(device) for t in context.bans)
    scores = mask_scores(scores, bt, config, context.lengths.to(device), context.num_backtracks.to(device), bans)
    logp = decoding_log_probs(scores, config)  # [B, S, V]
    taken = actions.to(device).clamp(min=0).unsqueeze(-1)  # [B, S, 1]
    logprobs = logp.gather(-1, taken).squeeze(-1).masked_fill(~mask, 0.0)  # [B, S]
    hidden = out.hidden_states[-1][rows, where.clamp(min=0)] if return_hidden else None  # [B, S, H]
    if not with_entropy:
        return ActionScores(logprobs, torch.zeros_like(logprobs), mask, hidden)
    probs = logp.exp()  # [B, S, V]
    entropy = -(probs * logp.clamp(min=torch.finfo(logp.dtype).min)).sum(-1).masked_fill(~mask, 0.0)  # [B, S]
    with torch.no_grad():
        top1 = (logp.argmax(-1) == taken.squeeze(-1)) & mask  # [B, S]
        mean_logit = logits.float().mean(-1).masked_fill(~mask, 0.0)  # [B, S]
    return ActionScores(logprobs, entropy, mask, hidden, top1, mean_logit)


def _accepts_logits_to_keep(model) -> bool:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


def score_rollout(model, rollout, *, return_hidden: bool = False) -> ActionScores:
    """:func:`score_actions` on a :class:`~halluc_rl.rollout.Rollout` with the options it was sampled with."""
    gen = rollout.generation
    return score_actions(model, rollout.prompt_ids, rollout.actions, gen.config, backtrack_id=gen.backtrack_id,
                         return_hidden=return_hidden, semantics=gen.semantics, override_semantics=True)
