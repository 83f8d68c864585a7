"""Backtrack-aware batched generation.

Every action costs one batched one-token forward pass: an appended token is fed; a backtrack rewinds the row's
cache by two tokens (the deleted one and the new last one) and feeds the new last token again, so its logits are
exact without re-encoding the prefix. A row whose response becomes empty reuses the logits saved after the prompt.
With no backtrack fired the loop is a plain cached decode and greedy output equals ``model.generate``. That is the
``rewind`` semantics; in ``retry`` (:data:`halluc_rl.backtrack.SEMANTICS`) a backtrack is fed like any token, so
every step is a plain cached decode and the deleted tokens stay in the context.

:func:`generate` checks its inputs and runs a :class:`~halluc_rl.engine.DecodeEngine` (the loop); the options,
the decoding rules and the output records live in :mod:`halluc_rl.decoding` and are importable from here too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields, replace

import torch

from halluc_rl.backtrack import EpisodeEnd, stop_token_ids
from halluc_rl.decoding import (
    BacktrackGenerationConfig,
    BacktrackGenerationOutput,
    LoopGuard,
    StepCallback,
    TraceEvent,
    decoding_log_probs,
    decoding_scores,
    mask_scores,
)
from halluc_rl.engine import DecodeEngine
from halluc_rl.policy import policy_backtrack, policy_semantics

__all__ = [
    "BacktrackGenerationConfig",
    "BacktrackGenerationOutput",
    "LoopGuard",
    "StepCallback",
    "TraceEvent",
    "decoding_log_probs",
    "decoding_scores",
    "generate",
    "mask_scores",
    "row_generators",
]


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
    semantics: str | None = None,
    override_semantics: bool = False,
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
    In ``retry`` a prefilled response is the action stream taken so far (backtracks included).

    ``semantics`` (``rewind`` or ``retry``, :data:`halluc_rl.backtrack.SEMANTICS`) defaults to the one recorded on
    ``model.config``; another one is refused unless ``override_semantics`` (:func:`halluc_rl.policy.policy_semantics`).

    Runs under ``torch.inference_mode``; the returned tensors are ordinary copies that trainers may use in autograd.
    """
    with torch.inference_mode():
        out = _generate(model, tokenizer, prompts, config, backtrack_id=backtrack_id, forced_actions=forced_actions,
                        generator=generator, callbacks=callbacks, responses=responses, num_branches=num_branches,
                        semantics=policy_semantics(model, semantics, override_semantics), **overrides)
    for name in ("actions", "kinds", "deleted", "positions", "num_backtracks", "num_deleted", "num_failed", "finished",
                 "logprobs"):
        value = getattr(out, name)
        if value is not None:
            setattr(out, name, value.clone())  # inference tensors cannot be saved for backward; copies can
    return out


def _generate(model, tokenizer, prompts, config, *, backtrack_id, forced_actions, generator, callbacks, responses,
              num_branches, semantics, **overrides) -> BacktrackGenerationOutput:
    """Check the inputs (in this order: the errors users see), build the engine and run it."""
    config, bt, head = _resolve_config(model, config, backtrack_id, overrides)
    device = next(model.parameters()).device
    input_ids, attention_mask, prefix = _prepare_prompts(tokenizer, prompts, responses, callbacks, device)
    if num_branches < 1:
        raise ValueError(f"num_branches must be >= 1, got {num_branches}")
    forced_actions = _check_rows(input_ids.shape[0] * num_branches, forced_actions, generator, device)
    if semantics == "retry":
        check_retry_context(model, input_ids.shape[1], config.max_new_tokens)
    stop_ids = stop_token_ids(tokenizer, getattr(model, "generation_config", None), config.eos_token_id)
    end = EpisodeEnd(stop_ids, config.stop_strings, config.max_new_tokens, tokenizer, device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    engine = DecodeEngine(model, tokenizer, config, backtrack_id=bt, head=head, end=end, pad=pad,
                          forced_actions=forced_actions, generator=generator, callbacks=callbacks,
                          semantics=semantics)
    was_training = model.training
    model.eval()
    try:
        out = engine.run(input_ids, attention_mask, prefix, num_branches)
    finally:
        if was_training:
            model.train()
    out.config, out.backtrack_id, out.backtrack_head, out.semantics = config, bt, head, semantics
    return out


def check_retry_context(model, prompt_tokens: int, max_new_tokens: int) -> None:
    """Refuse, before anything runs, a ``retry`` context that would outgrow the model's positions: in ``retry``
    every action stays in the context, so a row can reach ``prompt_tokens + max_new_tokens`` positions."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit is not None and prompt_tokens + max_new_tokens > int(limit):
        raise ValueError(f"semantics: a retry context of {prompt_tokens} prompt tokens + {max_new_tokens} actions "
                         f"exceeds the model's {int(limit)} positions (max_position_embeddings); lower "
                         "max_new_tokens or use semantics rewind")


def _resolve_config(model, config: BacktrackGenerationConfig | None, backtrack_id: int | None,
                    overrides: dict) -> tuple[BacktrackGenerationConfig, int, str]:
    """The options with ``overrides`` applied, and the policy's backtrack id and head (checked against the model)."""
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
    return config, bt, head


def _prepare_prompts(tokenizer, prompts, responses: Sequence[Sequence[int]] | None, callbacks: Sequence[StepCallback],
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor, list[list[int]] | None]:
    """Left-padded ids and mask [B, P] of the prompts, each followed by its prefilled response (returned too)."""
    input_ids, attention_mask = _encode_prompts(tokenizer, prompts, device)
    if responses is None:
        return input_ids, attention_mask, None
    if callbacks:
        raise NotImplementedError("reward followers cannot start from a prefilled response; score such "
                                  "continuations with outcome rewards (halluc_rl.values.mc_values)")
    if len(responses) != input_ids.shape[0]:
        raise ValueError(f"{len(responses)} responses for {input_ids.shape[0]} prompts")
    prefix = [list(map(int, r)) for r in responses]
    rows = [input_ids[b][attention_mask[b].bool()].tolist() + prefix[b] for b in range(len(prefix))]
    input_ids, attention_mask = _encode_prompts(tokenizer, rows, device)
    return input_ids, attention_mask, prefix


def _check_rows(batch: int, forced_actions: torch.Tensor | None, generator, device: torch.device) -> torch.Tensor | None:
    """Check that forced actions and per-row generators give one row per output row; the forced actions on
    ``device``."""
    if forced_actions is not None:
        forced_actions = forced_actions.to(device)
        if forced_actions.shape[0] != batch:
            raise ValueError(f"forced_actions has {forced_actions.shape[0]} rows for {batch} prompts")
    if isinstance(generator, (list, tuple)) and len(generator) != batch:
        raise ValueError(f"{len(generator)} generators for {batch} rows: give one per row (or one for the batch)")
    return forced_actions


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
