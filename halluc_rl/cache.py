"""Exact KV-cache rewind: the one adapter over transformers' ``Cache``.

Two levels:

* :func:`rewind_cache` drops the last ``n`` positions of every row (``Cache.crop(-n)``), with checks.
* :class:`RewindableCache` rewinds rows by *different* amounts. A rewound slot becomes a hole in the attention
  mask; every token is fed with an explicit ``position_ids`` equal to its row's live length, so holes never shift
  positions. Slots that are dead in every row at the end of the cache are cropped away at once (a batch of one, or
  rows that rewind alike, never leave holes), and when holes pile up in the middle the cache is compacted with one
  gather per layer. The next-token logits equal a fresh forward over each row's live tokens (tests: atol 1e-4 on
  Llama, Qwen2 and GPT-2). A rewind costs no forward pass.

Sliding-window layers (Mistral, Gemma-2) keep their past: transformers' ``crop`` would keep only window - 1 states,
so two rewinds in a row could not restore the window. Here a crop only drops the rewound states, and a
:class:`RewindableCache` keeps the last window - 1 prompt states plus the whole response, which is what a rewind
down to the prompt needs. A window spans slots, not live tokens, so a row must not read through a hole: before a
row with a hole is written, the cache is compacted (rows rewound by different amounts cost one gather per layer at
their next step). Tests: Mistral, Gemma-2 and a sliding Qwen2, window 8.
"""

from __future__ import annotations

import inspect

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, DynamicSlidingWindowLayer, StaticCache

from halluc_rl.backtrack import StepEvent


def _check_rewindable(cache: Cache) -> None:
    if isinstance(cache, StaticCache):
        raise TypeError(
            "StaticCache cannot be rewound (it has no crop). Use a DynamicCache: drop "
            "`cache_implementation='static'` from the generation config."
        )


def _sliding_loss(layer: DynamicSlidingWindowLayer, n: int) -> int:
    """How many states a crop of ``n`` would be short of on a sliding-window ``layer`` (0: the crop is exact).

    After the crop the layer holds ``L - n`` tokens and its next forward reads the last ``min(L - n, window - 1)``
    of them; the layer still has ``stored - n`` of its states.
    """
    stored = layer.keys.shape[-2] if layer.keys is not None else 0
    length = layer.get_seq_length()
    return max(0, min(length - n, layer.sliding_window - 1) - (stored - n))


def _crop_sliding(layer: DynamicSlidingWindowLayer, n: int) -> None:
    """Drop the last ``n`` states of a sliding-window layer and keep all the others.

    transformers' ``crop`` would also cut the layer back to window - 1 states, so that a second rewind could not
    restore the window; the states it keeps here are what make every later rewind exact.
    """
    layer.keys = layer.keys[:, :, : layer.keys.shape[-2] - n, :]  # [B, H, S - n, D]
    layer.values = layer.values[:, :, : layer.values.shape[-2] - n, :]  # [B, H, S - n, D]
    layer.cumulative_length -= n


def rewind_cache(cache: Cache, n: int) -> None:
    """Remove the last ``n`` positions of every row of ``cache`` (``crop(-n)`` in transformers 5).

    A sliding-window layer whose window is full is rewound exactly only if it kept the states the rewound window
    needs: a cache that records its past (``cache.activate_past_recording()`` before the first forward, as
    :class:`RewindableCache` does) keeps them all; any other raises rather than corrupt the window.
    """
    _check_rewindable(cache)
    if not isinstance(n, int) or isinstance(n, bool):
        raise TypeError(f"rewind expects an int number of tokens, got {type(n).__name__}")
    if n < 0:
        raise ValueError(f"cannot rewind a negative number of tokens ({n}); pass how many tokens to remove")
    length = cache.get_seq_length()
    if n > length:
        raise ValueError(f"cannot rewind {n} tokens: the cache holds only {length}")
    if n == 0:
        return
    sliding = [layer for layer in cache.layers if getattr(layer, "is_sliding", False) and layer.is_initialized]
    if not sliding:
        cache.crop(-n)
        return
    for layer in sliding:  # check every layer before touching any
        if not isinstance(layer, DynamicSlidingWindowLayer):
            raise TypeError(
                f"cannot rewind a {type(layer).__name__}: it keeps no past to restore its window from; use a "
                "DynamicCache (drop `cache_implementation` from the generation config)"
            )
        missing = _sliding_loss(layer, n)
        if missing:
            raise RuntimeError(
                f"cannot rewind {n} tokens on a sliding-window layer (window {layer.sliding_window}): it holds "
                f"{layer.get_seq_length()} tokens but kept only the last {layer.keys.shape[-2]} states, {missing} "
                "short of the rewound window. Call cache.activate_past_recording() before the first forward (or use "
                "RewindableCache, which does), and rewind with this function rather than cache.crop"
            )
    for layer in cache.layers:
        if type(layer) is DynamicSlidingWindowLayer:
            if layer.is_initialized:
                _crop_sliding(layer, n)
        else:
            layer.crop(-n)


class RewindableCache:
    """A KV cache whose rows can each be rewound by a different number of tokens, exactly.

    Usage: ``logits = rc.prefill(input_ids, attention_mask)`` (left-padded prompts), then per step
    ``rc.rewind(n)`` (int or [B] tensor) and ``logits = rc.step(tokens, write)``. A row whose ``write`` is false
    feeds a dummy token into a dead slot (its logits are meaningless; callers keep their own). Prompt tokens are
    protected: a rewind into the prompt raises.
    """

    def __init__(self, model, compact_min_holes: int = 32, compact_ratio: float = 0.25, cache: Cache | None = None):
        if not hasattr(model, "config"):
            raise TypeError("RewindableCache needs a transformers model (with a `config`)")
        if getattr(model.config, "is_encoder_decoder", False):
            raise TypeError("encoder-decoder models are not supported: backtracking rewinds a decoder-only cache")
        if cache is not None:
            _check_rewindable(cache)
        self.model = model
        self.cache = cache if cache is not None else DynamicCache(config=model.config)
        self.cache.activate_past_recording()
        self.sliding = any(getattr(layer, "is_sliding", False) for layer in self.cache.layers)
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT forwards **kwargs
        params = inspect.signature(inner.forward).parameters
        self._keep_arg = "logits_to_keep" in params
        # transformers >= 5.24 names the cache argument and output `cache` (`past_key_values` is deprecated); a
        # model whose forward predates it (remote code) still takes `past_key_values`
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._mask: torch.Tensor | None = None  # [B, T] 1 = live slot; None while every slot is live
        self._width = 0  # T, the number of slots
        self.compact_min_holes = compact_min_holes
        self.compact_ratio = compact_ratio
        self.num_compactions = 0
        self.live: torch.Tensor | None = None  # [B, cap] slot index of each live token, in order
        self.live_len: torch.Tensor | None = None  # [B] live tokens per row (= next position id)
        self.floor: torch.Tensor | None = None  # [B] prompt tokens, never rewound
        self._check_holes = False  # sliding models: a row may hold a hole (set by rewinds and masked writes)

    # -- forward passes ---------------------------------------------------------------------------------------
    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor,
                 keep: int = 1):
        """One forward; ``attention_mask=None`` when the cache has no holes (transformers then builds no mask)."""
        kwargs = {"logits_to_keep": keep} if self._keep_arg else {}
        kwargs[self._cache_arg] = self.cache
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **kwargs,
        )
        if getattr(out, self._cache_arg, None) is None and self.cache.get_seq_length() == 0:
            raise TypeError(
                f"{type(self.model).__name__} returned no KV cache; backtrack-aware decoding needs a model that "
                "supports a KV cache (a causal LM with use_cache=True)"
            )
        return out

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                response_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Encode left-padded prompts [B, P]; returns the next-token logits [B, V].

        ``response_lengths`` [B]: the last so many tokens of each row are a response already written (a state to
        go on from, say to branch from it): they can be rewound, and ``prompt_logits`` are read where the prompt
        ends.
        """
        if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError("prefill expects input_ids and attention_mask of the same shape [batch, prompt_len]")
        if not bool(attention_mask[:, -1].all()):
            raise ValueError("prompts must be left-padded (tokenizer.padding_side = 'left')")
        mask = attention_mask.long()  # [B, P]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, P]
        responses = torch.zeros_like(mask[:, 0]) if response_lengths is None else response_lengths.to(mask.device)
        longest = int(responses.max())
        out = self._forward(input_ids, mask, positions, keep=longest + 1)
        batch, width = mask.shape
        order = torch.argsort(mask * width + torch.arange(width, device=mask.device), dim=1)  # dead first, then live
        self.live_len = mask.sum(1)  # [B]
        if bool((responses >= self.live_len).any()):
            raise ValueError("every row needs at least one prompt token before its response")
        self.floor = self.live_len - responses  # [B]
        if self.sliding:
            self._forget_prompt_past()
        self._pad = width - self.live_len  # [B] left padding, the only holes a sliding-window model tolerates
        self._check_holes = False
        cap = max(2 * width, 64)
        self.live = torch.zeros(batch, cap, dtype=torch.long, device=mask.device)  # [B, cap]
        for b in range(batch):  # once per prompt, not per step
            n = int(self.live_len[b])
            self.live[b, :n] = order[b, width - n :]
        self._width = width
        self._set_mask(mask)
        self._ones = torch.ones(batch, 1, dtype=torch.long, device=mask.device)  # [B, 1]
        self._max_live = int(self.live_len.max())
        rows = torch.arange(batch, device=mask.device)
        self.prompt_logits = out.logits[rows, -1 - responses].clone()  # [B, V] what an empty response sees next
        return out.logits[:, -1]  # [B, V]

    @torch.no_grad()
    def fork(self, k: int) -> None:
        """Branch every row into ``k`` rows (row ``b`` becomes rows ``b*k .. b*k+k-1``), sharing nothing after.

        One ``repeat_interleave`` per cached tensor: ``k`` continuations of a state cost no re-encoding.
        """
        assert self.live_len is not None, "call prefill() first"
        if k == 1:
            return
        for layer in self.cache.layers:
            for name in ("keys", "values"):
                value = getattr(layer, name, None)
                if isinstance(value, torch.Tensor) and value.numel():
                    setattr(layer, name, value.repeat_interleave(k, dim=0))  # [B*k, H, T, D]
        for name in ("_mask", "live", "live_len", "floor", "_pad", "prompt_logits"):
            value = getattr(self, name)
            if isinstance(value, torch.Tensor):
                setattr(self, name, value.repeat_interleave(k, dim=0))
        self._ones = torch.ones(self.live_len.shape[0], 1, dtype=torch.long, device=self.live_len.device)

    @torch.no_grad()
    def follow(
        self, lengths: torch.Tensor, last_tokens: torch.Tensor, active: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Bring each row in line with a response of ``lengths`` [B] tokens ending in ``last_tokens`` [B].

        The backtrack invariant: the cache holds prompt + response[:-1] and response[-1] is fed, so every action -
        append, delete or failed delete - costs one batched one-token forward and no re-encoding. Rows whose
        response is empty get the prompt's logits; inactive rows are left alone. Returns next-token logits [B, V].
        """
        if active is None:
            active = torch.ones_like(lengths, dtype=torch.bool)
        target = self.floor + (lengths - 1).clamp(min=0)  # [B] live tokens to keep
        self.rewind(torch.where(active, self.live_len - target, 0))
        write = active & (lengths > 0)  # [B]
        if not bool(write.any()):
            return self.prompt_logits.clone()
        logits = self.step(torch.where(write, last_tokens, 0), None if bool(write.all()) else write)  # [B, V]
        return torch.where(write.unsqueeze(1), logits, self.prompt_logits)

    @torch.no_grad()
    def follow_event(self, event: StepEvent, semantics: str = "rewind") -> torch.Tensor:
        """Advance with one step of a policy's decoding (a follower's cache: value models, implicit PRMs): in
        ``rewind`` follow the visible text (:meth:`follow`); in ``retry`` feed every row's action, a backtrack too,
        as the policy's own cache does. Returns next-token logits [B, V]."""
        device = self.live_len.device  # the policy may live on another device
        if semantics == "retry":
            return self.step(event.actions.to(device))
        state = event.state
        return self.follow(state.lengths.to(device), state.last_tokens(torch.zeros_like(state.lengths)).to(device),
                           event.active.to(device))

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, write: torch.Tensor | None = None) -> torch.Tensor:
        """Feed one token per row [B]; rows with ``write`` false get a dead slot. Returns logits [B, V].

        On a sliding-window model, a written row that holds a hole is compacted first (see :meth:`_close_holes`).
        """
        assert self.live_len is not None, "call prefill() first"
        if self.sliding:
            if self._check_holes:
                self._close_holes(write)
            self._check_holes = write is not None  # rows not written now get a hole
        slot = self._width
        self._width += 1
        if write is not None or self._mask is not None:
            column = self._ones if write is None else write.long().unsqueeze(1)  # [B, 1]
            self._mask = torch.cat([self.mask, column], dim=1)  # [B, T+1]
        out = self._forward(tokens.unsqueeze(1), self._mask, self.live_len.unsqueeze(1))
        self._max_live += 1  # an upper bound, kept in Python to avoid a sync per step
        if self.live.shape[1] <= self._max_live:
            self.live = torch.cat([self.live, torch.zeros_like(self.live)], dim=1)
        idx = self.live_len.unsqueeze(1)  # [B, 1]
        if write is None:
            self.live.scatter_(1, idx, torch.full_like(idx, slot))
            self.live_len = self.live_len + 1
        else:
            self.live.scatter_(1, idx, torch.where(write, slot, self.live.gather(1, idx).squeeze(1)).unsqueeze(1))
            self.live_len = self.live_len + write.long()
        return out.logits[:, -1]  # [B, V]

    def _forget_prompt_past(self) -> None:
        """Keep the last window - 1 prompt states of each sliding-window layer, the most a rewind can bring back.

        Past recording keeps every state until a crop; rewinds never reach into the prompt, so older prompt states
        are never read again, while the response's states all stay (any rewind down to the prompt is exact).
        """
        response = int((self.live_len - self.floor).max())  # prefilled response tokens stay rewindable
        for layer in self.cache.layers:
            if type(layer) is DynamicSlidingWindowLayer and layer.is_initialized:
                drop = layer.keys.shape[-2] - (layer.sliding_window - 1) - response
                if drop > 0:
                    layer.keys = layer.keys[:, :, drop:, :]  # [B, H, window - 1, D]
                    layer.values = layer.values[:, :, drop:, :]  # [B, H, window - 1, D]

    # -- rewinds ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def rewind(self, n: int | torch.Tensor) -> None:
        """Forget the last ``n`` live tokens of each row (``n``: an int, or a [B] tensor of per-row counts)."""
        assert self.live_len is not None, "call prefill() first"
        if isinstance(n, int):
            n = torch.full_like(self.live_len, n)
        if not bool(n.any()):
            return
        if n.shape != self.live_len.shape:
            raise ValueError(f"rewind counts must have shape {tuple(self.live_len.shape)}, got {tuple(n.shape)}")
        if bool((n < 0).any()):
            raise ValueError(f"cannot rewind a negative number of tokens: {n.tolist()}")
        room = self.live_len - self.floor  # [B]
        if bool((n > room).any()):
            row = int(torch.nonzero(n > room)[0])
            raise ValueError(
                f"cannot rewind {int(n[row])} tokens in row {row}: it has only {int(room[row])} generated tokens "
                "(rewinds never reach into the prompt)"
            )
        cap = self.live.shape[1]
        j = torch.arange(cap, device=n.device).unsqueeze(0)  # [1, cap]
        kill = (j >= (self.live_len - n).unsqueeze(1)) & (j < self.live_len.unsqueeze(1))  # [B, cap]
        rows, cols = torch.nonzero(kill, as_tuple=True)
        mask = self.mask
        mask[rows, self.live[rows, cols]] = 0
        self.live_len = self.live_len - n
        self._max_live = int(self.live_len.max())
        self._mask = mask
        self._trim()
        self._check_holes = self.sliding  # rows rewound by different amounts keep holes
        self._maybe_compact()
        self._set_mask(self._mask)

    @property
    def mask(self) -> torch.Tensor:
        """[B, T] 1 where a slot is live (materialised on demand while the cache has no holes)."""
        if self._mask is None:
            return torch.ones(self.live_len.shape[0], self._width, dtype=torch.long, device=self.live_len.device)
        return self._mask

    def _set_mask(self, mask: torch.Tensor) -> None:
        self._mask = None if bool(mask.all()) else mask

    def _trim(self) -> None:
        """Crop slots that are dead in every row at the end of the cache: a true ``crop(-k)``."""
        width = self._width
        top = self.live.gather(1, (self.live_len - 1).clamp(min=0).unsqueeze(1)).squeeze(1)  # [B]
        needed = int(torch.where(self.live_len > 0, top + 1, 0).max())
        if needed < width:
            rewind_cache(self.cache, width - needed)
            self._mask = self._mask[:, :needed]
            self._width = needed

    def _close_holes(self, write: torch.Tensor | None) -> None:
        """Compact before a row with a hole is written: a sliding window spans slots, so the hole would cost the row
        a token of its window. Rows not written (``write`` false) may keep theirs: their logits are not used."""
        holes = self._width - self.live_len > self._pad  # [B] a dead slot between the padding and the last token
        if write is not None:
            holes &= write
        if bool(holes.any()):
            self.compact()
            self._set_mask(self._mask)

    @property
    def num_holes(self) -> int:
        """Dead slots the widest row carries (left padding included)."""
        return self._width - int(self.live_len.max())

    def _maybe_compact(self) -> None:
        holes = self.num_holes
        if holes >= self.compact_min_holes and holes >= self.compact_ratio * self._width:
            self.compact()

    @torch.no_grad()
    def compact(self) -> None:
        """Squeeze the holes out: each row's live slots move right (left padding), one gather per layer."""
        mask = self.mask
        batch, width = mask.shape
        new_width = int(self.live_len.max())
        order = torch.argsort(mask * width + torch.arange(width, device=self.mask.device), dim=1)  # [B, T]
        keep = order[:, width - new_width :]  # [B, T'] the live slots (plus left padding), in order
        reach = int((self.live_len - self.floor).max()) if self.sliding else 0  # the longest response
        for layer in self.cache.layers:
            if type(layer) is DynamicLayer:
                slots = keep  # [B, T']
            elif type(layer) is DynamicSlidingWindowLayer:
                # a sliding layer stores the states of its last S slots; it keeps what a rewind down to the
                # prompt reads. Slots clamped to 0 are left padding or prompt tokens no window reaches again.
                stored = layer.keys.shape[-2] if layer.is_initialized else 0
                kept = min(new_width, reach + layer.sliding_window - 1)
                slots = (keep[:, new_width - kept :] - (width - stored)).clamp(min=0)  # [B, kept]
                layer.cumulative_length = new_width
            else:
                raise NotImplementedError(
                    f"cannot compact a {type(layer).__name__}; only DynamicLayer and DynamicSlidingWindowLayer are "
                    "supported"
                )
            if layer.keys is None or layer.keys.numel() == 0:
                continue
            _, heads, _, dim = layer.keys.shape
            index = slots[:, None, :, None].expand(batch, heads, slots.shape[1], dim)  # [B, H, T', D]
            layer.keys = layer.keys.gather(2, index)
            layer.values = layer.values.gather(2, index.expand(-1, -1, -1, layer.values.shape[-1]))
        new_slot = torch.zeros_like(mask)  # [B, T] old slot -> new slot
        new_slot.scatter_(1, keep, torch.arange(new_width, device=keep.device).expand(batch, -1))
        self.live = new_slot.gather(1, self.live.clamp(max=width - 1))
        self._mask = mask.gather(1, keep)
        self._width = new_width
        self._pad = new_width - self.live_len
        self._check_holes = False
        self.num_compactions += 1
