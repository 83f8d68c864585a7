"""What `<|BACKTRACK|>` means: the one home of the backtrack semantics.

A response is built from a stream of actions. A normal token appends itself; the backtrack token deletes the last
visible *response* token, like a backspace. It never deletes into the prompt: a backtrack on an empty response is a
no-op, counted as a failed backtrack. Backtrack tokens never appear in the visible text, and trailing backtracks
apply.

| action stream          | visible response | backtracks | deleted | failed | the model then conditions on (`rewind`) | (`retry`)              |
|------------------------|------------------|------------|---------|--------|-----------------------------------------|------------------------|
| `a b c`                | `a b c`          | 0          | 0       | 0      | `a b c`                                 | `a b c`                |
| `a b <BT> c`           | `a c`            | 1          | 1       | 0      | `a c`                                   | `a b <BT> c`           |
| `a <BT> <BT> b`        | `b`              | 2          | 1       | 1      | `b`                                     | `a <BT> <BT> b`        |
| `a b <BT> <BT>`        | (empty)          | 2          | 2       | 0      | (empty)                                 | `a b <BT> <BT>`        |

The visible response (what graders, rewards, users and the env's ``info["text"]`` see) is the same in both
semantics (:data:`SEMANTICS`). They differ in what the model is fed for its next action:

* ``rewind`` (the default): the visible text only. The KV cache is rewound on a backspace, so after it the model is
  exactly where it was before typing the deleted token, and has forgotten what it tried. Its memory of what was
  tried is the decoder's visited memory (:class:`halluc_rl.decoding.LoopGuard`, keyed on the visible prefix).
* ``retry``: every action so far, in order. Deleted tokens and backtrack tokens stay in the context, and the KV
  cache only appends (the in-context retry of Physics of Language Models 2.2, Ye et al. 2024).

Three views of the same rule live here, and the tests hold them equal:

* :func:`apply_actions` - a pure function over a whole action list;
* :class:`BacktrackState` - an incremental state (push/pop) for one sequence (the env uses it);
* :class:`BatchedBacktrackState` - the same rule on a batch of rows as tensor operations (generation and rollouts
  use it, so a step costs no Python loop over rows).

The MDP's other shared pieces live here too: :class:`StepEvent`, the one record of a step that reward models and
followers receive; :func:`stop_token_ids` (the ids that end an episode) and :class:`EpisodeEnd`, the one episode-end rule
(generation and the env); and
:func:`stream_layout`, an action stream laid out for one teacher-forced forward in either semantics (the scorer and
the collator pack it).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np
import torch

BACKTRACK_TOKEN = "<|BACKTRACK|>"
"""The special token that deletes the previous response token."""

SEMANTICS: tuple[str, ...] = ("rewind", "retry")
"""What a backspace leaves in the model's context (the table above): the two semantics by name."""
DEFAULT_SEMANTICS = "rewind"


def check_semantics(name: str) -> str:
    """``name`` if it is one of :data:`SEMANTICS`, else a one-line ``ValueError`` naming them."""
    if name not in SEMANTICS:
        raise ValueError(f"semantics: unknown value {name!r}; use 'rewind' (a backspace forgets what it deleted) or "
                         "'retry' (deleted tokens and backtracks stay in the model's context)")
    return name


class ActionKind(IntEnum):
    """What one action did. Stored in generation traces as small integers."""

    INACTIVE = -1  # the row had already finished; the action was ignored
    APPEND = 0  # a normal token was appended
    DELETE = 1  # a backtrack deleted the last visible response token
    FAILED = 2  # a backtrack on an empty response: a no-op


def backtrack_token_id(tokenizer, token: str = BACKTRACK_TOKEN) -> int:
    """Return the id of the backtrack token, looked up as a token (never ``encode(token)[0]``, which is BOS on Llama).

    Raises a ``ValueError`` that says how to add the token when the tokenizer does not know it.
    """
    if token == BACKTRACK_TOKEN:  # a reserved special token may play the role (see modeling.add_backtrack_token)
        recorded = (getattr(tokenizer, "init_kwargs", None) or {}).get("backtrack_token")
        recorded = recorded or getattr(tokenizer, "backtrack_token", None)  # as reloaded from tokenizer_config.json
        token = recorded if isinstance(recorded, str) else token
    vocab = tokenizer.get_vocab()
    if token in vocab:
        return int(vocab[token])
    added = getattr(tokenizer, "added_tokens_encoder", {}) or {}
    if token in added:
        return int(added[token])
    raise ValueError(
        f"The tokenizer has no backtrack token {token!r}. Add it (and resize the model's embeddings) with "
        "`halluc_rl.modeling.add_backtrack_token(model, tokenizer)` before building backtrack data or generating."
    )


@dataclass
class BacktrackResult:
    """The outcome of applying a whole action stream to an empty response."""

    visible_ids: list[int]
    num_backtracks: int = 0
    num_deleted: int = 0
    num_failed: int = 0
    deleted_ids: list[int] = field(default_factory=list)


def apply_actions(actions: Iterable[int], backtrack_id: int) -> BacktrackResult:
    """Apply an action stream to an empty response (the pure-function view of the semantics)."""
    visible: list[int] = []
    deleted: list[int] = []
    backtracks = failed = 0
    for action in actions:
        if action == backtrack_id:
            backtracks += 1
            if visible:
                deleted.append(visible.pop())
            else:
                failed += 1
        else:
            visible.append(int(action))
    return BacktrackResult(visible, backtracks, len(deleted), failed, deleted)


@dataclass
class StepOutcome:
    """What a single action did to a :class:`BacktrackState`."""

    kind: ActionKind
    token: int  # the action itself
    deleted: int | None  # the token removed by a DELETE, else None
    position: int  # response index the action wrote to or deleted from (length after a failed backtrack)


class BacktrackState:
    """Incremental backtrack state of one response: push actions one at a time and read the visible ids."""

    def __init__(self, backtrack_id: int, max_length: int | None = None) -> None:
        self.backtrack_id = int(backtrack_id)
        self.max_length = max_length
        self._visible: list[int] = []
        self.deleted_ids: list[int] = []
        self.num_backtracks = 0
        self.num_deleted = 0
        self.num_failed = 0
        self.num_actions = 0

    @property
    def visible_ids(self) -> list[int]:
        """The visible response token ids (a copy)."""
        return list(self._visible)

    def __len__(self) -> int:
        return len(self._visible)

    def push(self, action: int) -> StepOutcome:
        """Apply one action (a token id or the backtrack id)."""
        action = int(action)
        self.num_actions += 1
        if action == self.backtrack_id:
            self.num_backtracks += 1
            if not self._visible:
                self.num_failed += 1
                return StepOutcome(ActionKind.FAILED, action, None, 0)
            return self.pop()
        if self.max_length is not None and len(self._visible) >= self.max_length:
            raise ValueError(f"response is full ({self.max_length} tokens); raise max_length or stop earlier")
        self._visible.append(action)
        return StepOutcome(ActionKind.APPEND, action, None, len(self._visible) - 1)

    def pop(self) -> StepOutcome:
        """Delete the last visible token (what a backtrack does on a non-empty response)."""
        if not self._visible:
            raise IndexError("cannot pop from an empty response: backtracks never delete into the prompt")
        token = self._visible.pop()
        self.deleted_ids.append(token)
        self.num_deleted += 1
        return StepOutcome(ActionKind.DELETE, self.backtrack_id, token, len(self._visible))

    def result(self) -> BacktrackResult:
        return BacktrackResult(self.visible_ids, self.num_backtracks, self.num_deleted, self.num_failed,
                               list(self.deleted_ids))


def correction_actions(
    prefix: Sequence[int], error: Sequence[int], correction: Sequence[int], backtrack_id: int
) -> list[int]:
    """The action stream that writes ``prefix``, then ``error``, deletes it, then writes ``correction``.

    Its visible result is ``prefix + correction``: the shape of every backtrack training example.
    """
    return [*prefix, *error, *([backtrack_id] * len(error)), *correction]


class BatchedBacktrackState:
    """The backtrack rule on ``B`` rows at once, as tensor operations (no Python loop over rows).

    ``ids[b, :lengths[b]]`` is row ``b``'s visible response. ``step(actions, active)`` applies one action per row and
    returns its :class:`ActionKind` codes and the deleted tokens (``-1`` where nothing was deleted).
    """

    def __init__(self, batch_size: int, capacity: int, backtrack_id: int, device: torch.device | str = "cpu"):
        self.backtrack_id = int(backtrack_id)
        self.capacity = int(capacity)
        self.ids = torch.zeros(batch_size, max(capacity, 1), dtype=torch.long, device=device)  # [B, cap]
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)  # [B]
        self.num_backtracks = torch.zeros(batch_size, dtype=torch.long, device=device)  # [B]
        self.num_deleted = torch.zeros(batch_size, dtype=torch.long, device=device)  # [B]
        self._steps = 0  # lengths can only exceed the capacity after `capacity` steps

    @property
    def num_failed(self) -> torch.Tensor:
        """[B] backtracks that found an empty response."""
        return self.num_backtracks - self.num_deleted

    def step(self, actions: torch.Tensor, active: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply ``actions`` [B] to the rows where ``active`` [B] is true. Returns (kinds [B], deleted [B])."""
        is_bt = actions == self.backtrack_id  # [B]
        append = ~is_bt  # [B]
        if active is not None:
            is_bt &= active
            append &= active
        delete = is_bt & (self.lengths > 0)  # [B]
        self._steps += 1
        if self._steps > self.capacity and bool((append & (self.lengths >= self.capacity)).any()):
            raise ValueError(f"a response is full ({self.capacity} tokens); raise the capacity")
        last = (self.lengths - 1).clamp(min=0).unsqueeze(1)  # [B, 1]
        deleted = torch.where(delete, self.ids.gather(1, last).squeeze(1), -1)  # [B]
        write_at = self.lengths.clamp(max=self.capacity - 1).unsqueeze(1)  # [B, 1]
        self.ids.scatter_(1, write_at, torch.where(append, actions, self.ids.gather(1, write_at).squeeze(1)).unsqueeze(1))
        self.lengths += append.long() - delete.long()
        self.num_backtracks += is_bt.long()
        self.num_deleted += delete.long()
        # APPEND 0, DELETE 1, FAILED 2, INACTIVE -1
        kinds = torch.where(is_bt, 2 - delete.long(), append.long() - 1)  # [B]
        return kinds, deleted

    def load(self, responses: Sequence[Sequence[int]]) -> None:
        """Start each row from a response already written (a state to go on from, say to branch from it)."""
        for b, response in enumerate(responses):
            if len(response) > self.capacity:
                raise ValueError(f"a response of {len(response)} tokens does not fit the capacity {self.capacity}")
            self.ids[b, : len(response)] = torch.as_tensor(list(response), dtype=torch.long)
            self.lengths[b] = len(response)

    def visible(self, row: int) -> list[int]:
        """Row ``row``'s visible response ids."""
        return self.ids[row, : int(self.lengths[row])].tolist()

    def last_tokens(self, fallback: torch.Tensor) -> torch.Tensor:
        """Each row's last visible token, or ``fallback`` [B] where the response is empty."""
        last = (self.lengths - 1).clamp(min=0).unsqueeze(1)  # [B, 1]
        return torch.where(self.lengths > 0, self.ids.gather(1, last).squeeze(1), fallback)  # [B]


@dataclass
class StepEvent:
    """The one record of an MDP step on a batch of rows: what one action did, for followers that mirror the policy
    (reward models with their own caches, value followers) and for the env's reward plug-ins.

    A follower with its own :class:`~halluc_rl.cache.RewindableCache` stays exact with
    ``cache.follow_event(event, event.semantics)`` (or ``"rewind"`` for a model that reads the visible text).
    """

    step: int
    actions: torch.Tensor  # [B] action per row (pad where inactive)
    kinds: torch.Tensor  # [B] ActionKind codes, -1 where the row was already done
    deleted: torch.Tensor  # [B] deleted token, -1 where none
    active: torch.Tensor  # [B] rows that took an action this step (a row that just stopped included)
    state: BatchedBacktrackState
    semantics: str = DEFAULT_SEMANTICS  # what the policy conditions on (a follower of the policy feeds the same)


def stop_token_ids(tokenizer, generation_config=None, eos_token_id: int | Sequence[int] | None = None) -> list[int]:
    """The actions that end an episode: the one definition generation and the env share.

    ``eos_token_id`` when given (``[]``: nothing stops), else the tokenizer's EOS plus the generation config's EOS ids
    (Llama-3 and SmolLM2 stop on several), as ``model.generate`` does. An EOS ends an episode when it is appended.
    """
    def as_list(value) -> list[int]:
        return [] if value is None else [int(value)] if isinstance(value, (int, np.integer)) else [int(v) for v in value]

    if eos_token_id is not None:
        return as_list(eos_token_id)
    ids = as_list(getattr(tokenizer, "eos_token_id", None)) + as_list(getattr(generation_config, "eos_token_id", None))
    return list(dict.fromkeys(ids))


@dataclass
class RewindLayout:
    """A backtrack action stream laid out for one teacher-forced forward pass that sees what generation sees.

    (:func:`retry_layout` fills the same fields for ``retry``: there the layout is the plain causal stream.)
    In ``rewind``, generation rewinds the KV cache on every backspace, so each action is chosen from the *visible* text alone.
    Replaying the stream with a stack gives a tree of visible states; packing it flat:

    * ``input_ids[i]`` is a typed token (prompt, correct, error or correction; backtrack tokens are never inputs);
    * ``position_ids[i]`` is its index in the visible text when it was typed;
    * ``parents[i]`` is the flat index of the visible token just before it (-1 for the first): it may attend to
      its parent's chain and itself, the visible text when it was typed (:func:`ancestor_mask`);
    * ``labels[i + 1] = t`` trains action ``t`` from the state whose last visible token is flat token ``i``
      (Hugging Face models shift labels by one), so the loss on every action uses exactly the logits generation
      computes for that state. ``-100`` elsewhere;
    * ``predictors[j]`` is the flat index of the last visible token of the state response action ``j`` was taken
      from: the scorer reads action ``j``'s logits there (several actions can share a state, which labels cannot).
    """

    input_ids: list[int]
    position_ids: list[int]
    parents: list[int]
    labels: list[int]
    predictors: list[int]


def rewind_layout(actions: Sequence[int], trained: Sequence[bool] | None, backtrack_id: int, prompt_length: int,
                  ignore_index: int = -100, pad_id: int = 0) -> RewindLayout:
    """Lay out ``actions`` (prompt ids, then the response's action stream) as a :class:`RewindLayout`.

    ``trained[k]`` says whether action ``k`` (``k >= prompt_length``) is a training target (None: every action).
    When two trained actions are taken from the same state (rare), the later one wins in ``labels``;
    ``predictors`` keeps every action's state.
    """
    if prompt_length < 1:
        raise ValueError("the action stream needs at least one prompt token to predict the first action from")
    ids: list[int] = []
    pos: list[int] = []
    parents: list[int] = []
    targets: dict[int, int] = {}  # predictor flat index -> trained action
    predictors: list[int] = []  # per response action: flat index of its state's last visible token
    stack: list[int] = []  # flat indices of the visible tokens, prompt included
    for k, action in enumerate(actions):
        if k >= prompt_length:
            predictors.append(stack[-1])
            if trained is None or trained[k]:
                targets[stack[-1]] = int(action)
        if action == backtrack_id and k >= prompt_length:
            if len(stack) > prompt_length:  # never into the prompt (a failed backtrack is a no-op)
                stack.pop()
            continue
        parents.append(stack[-1] if stack else -1)
        pos.append(len(stack))
        stack.append(len(ids))
        ids.append(int(action))
    if max(targets, default=-1) + 1 >= len(ids):  # the last token predicts something: give its label a slot
        parents.append(-1)  # a padding slot: it sees only itself
        pos.append(pos[-1] + 1)
        ids.append(pad_id)
    labels = [ignore_index] * len(ids)
    for predictor, target in targets.items():
        labels[predictor + 1] = target
    return RewindLayout(ids, pos, parents, labels, predictors)


def retry_layout(actions: Sequence[int], trained: Sequence[bool] | None, backtrack_id: int, prompt_length: int,
                 ignore_index: int = -100, pad_id: int = 0) -> RewindLayout:
    """Lay out ``actions`` (prompt ids, then the response's action stream) for the ``retry`` semantics.

    Generation in ``retry`` feeds every action, backtracks included, so the stream is one causal sequence:
    ``input_ids`` is the stream itself at positions ``0..n-1``, each token's parent is the token before it, action
    ``k`` is predicted from flat index ``k - 1`` (``labels[k]`` when ``trained[k]``). ``backtrack_id`` and
    ``pad_id`` are unused (every action is an input; no padding slot is needed): the signature is
    :func:`rewind_layout`'s, so :func:`stream_layout` can choose either.
    """
    if prompt_length < 1:
        raise ValueError("the action stream needs at least one prompt token to predict the first action from")
    ids = [int(a) for a in actions]
    labels = [ignore_index] * len(ids)
    for k in range(prompt_length, len(ids)):
        if trained is None or trained[k]:
            labels[k] = ids[k]
    return RewindLayout(ids, list(range(len(ids))), list(range(-1, len(ids) - 1)), labels,
                        list(range(prompt_length - 1, len(ids) - 1)))


def stream_layout(semantics: str, actions: Sequence[int], trained: Sequence[bool] | None, backtrack_id: int,
                  prompt_length: int, ignore_index: int = -100, pad_id: int = 0) -> RewindLayout:
    """The layout of ``semantics``: :func:`rewind_layout` or :func:`retry_layout` (the same arguments)."""
    layout = {"rewind": rewind_layout, "retry": retry_layout}[check_semantics(semantics)]
    return layout(actions, trained, backtrack_id, prompt_length, ignore_index, pad_id)


def ancestor_mask(parents: Sequence[int]) -> np.ndarray:
    """Boolean [L, L] matrix, True where token i may attend to token j: j is i itself or on its parent chain.

    One row copy per token (a token sees what its parent saw, plus itself): O(L) NumPy operations, no O(L^2) Python.
    """
    n = len(parents)
    allowed = np.zeros((n, n), dtype=bool)  # [L, L]
    for i, parent in enumerate(parents):  # parents come before their children
        if parent >= 0:
            allowed[i] = allowed[parent]
        allowed[i, i] = True
    return allowed


class EpisodeEnd:
    """When an episode ends: the one rule generation and the env share.

    * Terminated: the action *appended* a token (a backtrack never ends an episode) that is one of ``stop_ids``
      (:func:`stop_token_ids`), or after which the visible response text (decoded without special tokens, as
      ``texts`` and the env's ``info["text"]`` are) ends with one of ``stop_strings``.
    * Truncated: ``max_actions`` actions were taken, backtracks included, and the last one did not terminate.

    The stop strings are matched on the text of the response's last ``longest stop + 8`` tokens, so a step costs
    no decode of the whole response; when that tail decodes to too few characters to decide (special tokens, odd
    byte pieces), the whole response is decoded instead.
    """

    def __init__(self, stop_ids: Sequence[int], stop_strings: Sequence[str] = (), max_actions: int | None = None,
                 tokenizer=None, device: torch.device | str = "cpu"):
        self.stop_ids = [int(i) for i in stop_ids]
        self.stop_strings = tuple(stop_strings)
        self.max_actions = None if max_actions is None else int(max_actions)
        if self.stop_strings and tokenizer is None:
            raise ValueError("stop strings need the tokenizer to read the visible text")
        self.tokenizer = tokenizer
        self._ids = torch.tensor(self.stop_ids, dtype=torch.long, device=device)  # [K]
        self._single = self.stop_ids[0] if len(self.stop_ids) == 1 else None
        self._max_stop = max((len(s) for s in self.stop_strings), default=0)

    def terminated(self, actions: torch.Tensor, kinds: torch.Tensor, state: BatchedBacktrackState) -> torch.Tensor:
        """[B] rows whose action ``actions`` [B] (with :class:`ActionKind` codes ``kinds`` [B]) ends the episode,
        read on ``state`` after the action."""
        appended = kinds == int(ActionKind.APPEND)  # [B]
        if self._single is not None:
            done = appended & (actions == self._single)  # [B]
        elif self.stop_ids:
            done = appended & torch.isin(actions, self._ids)  # [B]
        else:
            done = torch.zeros_like(appended)  # [B]
        if self._max_stop:
            for b in torch.nonzero(appended & ~done).flatten().tolist():
                done[b] = self.ends_with_stop_string(state.ids[b], int(state.lengths[b]))
        return done

    def ends_with_stop_string(self, ids: torch.Tensor, length: int) -> bool:
        """Whether the visible text of the response ``ids[:length]`` ends with one of the stop strings."""
        start = max(0, length - self._max_stop - 8)
        tail = self.tokenizer.decode(ids[start:length].tolist(), skip_special_tokens=True)
        if start and len(tail) < self._max_stop + 4:  # too short to decide on: read the whole response
            tail = self.tokenizer.decode(ids[:length].tolist(), skip_special_tokens=True)
        return any(tail.endswith(s) for s in self.stop_strings)

    def truncated(self, num_actions: int, terminated: bool = False) -> bool:
        """Whether an episode that has taken ``num_actions`` actions, the last one ``terminated`` or not, is cut."""
        return not terminated and self.max_actions is not None and num_actions >= self.max_actions
