"""Reward models that plug in: outcome rewards at episode end, process rewards per action, shaping terms.

Two small protocols, both batched over rows (the env is a batch of one):

* an **outcome** reward scores finished responses: ``score(texts, problems) -> [B]``;
* a **process** reward scores each action as it happens: ``start(input_ids, attention_mask)`` once per batch of
  prompts, then ``step(event) -> [B]`` after every action (``event`` is a :class:`~halluc_rl.backtrack.StepEvent`).

:class:`RewardMixer` combines any number of them with weights plus :class:`Shaping` terms, and is itself a
generation callback, so a rollout computes process rewards in lock-step with decoding.

Writing your own reward model::

    class LengthPenalty:
        name, kind = "length", "outcome"
        def score(self, texts, problems):
            return [-len(t) / 100 for t in texts]

    env = gym.make("Backtrack-Arithmetic-v0", rewards=[(RuleGrader(), 1.0), (LengthPenalty(), 0.5)])

A plain function works too: ``CallableReward(fn, kind="outcome")`` with ``fn(text, problem) -> float``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import torch

from halluc_rl.backtrack import ActionKind, StepEvent
from halluc_rl.cache import RewindableCache
from halluc_rl.data.deps import parse_question
from halluc_rl.data.deps_check import check_solution
from halluc_rl.data.grading import reward as grade
from halluc_rl.data.problems import Problem, format_solution


@runtime_checkable
class OutcomeReward(Protocol):
    name: str
    kind: Literal["outcome"]

    def score(self, texts: Sequence[str], problems: Sequence[Problem]) -> Sequence[float] | torch.Tensor: ...


@runtime_checkable
class ProcessReward(Protocol):
    name: str
    kind: Literal["process"]

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None: ...

    def step(self, event: StepEvent) -> torch.Tensor: ...


class RuleGrader:
    """The default outcome reward: 1.0 when the response's final number equals the gold answer, else 0.0."""

    name = "correct"
    kind = "outcome"

    def score(self, texts: Sequence[str], problems: Sequence[Problem]) -> list[float]:
        return [grade(text, problem.answer) for text, problem in zip(texts, problems)]


class CallableReward:
    """Any Python callable as a reward.

    ``kind="outcome"``: ``fn(text, problem) -> float`` once per finished response.
    ``kind="process"``: ``fn(prompt_ids, visible_ids) -> float`` after every action of every row (simple, but
    Python-speed; an incremental model such as :class:`HFProcessReward` is the fast path).
    """

    def __init__(self, fn: Callable[..., float], kind: Literal["outcome", "process"] = "outcome", name: str | None = None):
        if kind not in ("outcome", "process"):
            raise ValueError(f"kind must be 'outcome' or 'process', got {kind!r}")
        self.fn, self.kind = fn, kind
        self.name = name or getattr(fn, "__name__", "callable")
        self._prompts: list[list[int]] = []

    def score(self, texts: Sequence[str], problems: Sequence[Problem]) -> list[float]:
        return [float(self.fn(text, problem)) for text, problem in zip(texts, problems)]

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        self._prompts = [input_ids[b][attention_mask[b].bool()].tolist() for b in range(input_ids.shape[0])]

    def step(self, event: StepEvent) -> torch.Tensor:
        out = torch.zeros(len(self._prompts))
        for b in torch.nonzero(event.active).flatten().tolist():
            out[b] = float(self.fn(self._prompts[b], event.state.visible(b)))
        return out


class IncrementalScorer:
    """Scores every prefix of a response with a Hugging Face model that keeps its own KV cache.

    The cache follows the policy's actions (nothing is re-encoded): the visible text by default (a backspace
    rewinds it: a PRM scores the visible text in both semantics), or, with ``follows="policy"`` (a value model),
    what the policy conditions on in its semantics (:meth:`RewindableCache.follow_event`). ``model`` is a
    token-classification model (``AutoModelForTokenClassification``) or anything whose forward returns per-token
    ``logits`` [B, T, L]; the score of a prefix is read at its last token: the softmax probability of ``label`` when
    L > 1, else ``transform`` of the single logit. The model must share the policy's tokenizer.
    """

    def __init__(self, model, label: int = 1, transform: Literal["sigmoid", "identity"] = "sigmoid",
                 follows: Literal["visible", "policy"] = "visible"):
        self.model, self.label, self.transform, self.follows = model, label, transform, follows
        self.cache: RewindableCache | None = None
        self.current: torch.Tensor | None = None  # [B] score of each row's current prefix

    def _score(self, logits: torch.Tensor) -> torch.Tensor:  # [B, L] -> [B]
        logits = logits.float()
        if logits.shape[-1] > 1:
            return torch.softmax(logits, -1)[:, self.label]
        return torch.sigmoid(logits[:, 0]) if self.transform == "sigmoid" else logits[:, 0]

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        device = next(self.model.parameters()).device
        self.cache = RewindableCache(self.model)
        self.current = self._score(self.cache.prefill(input_ids.to(device), attention_mask.to(device)))
        return self.current

    def follow(self, event: StepEvent) -> torch.Tensor:
        """Advance with one policy step; returns the new score of each acting row's prefix [B]."""
        active = event.active.to(self.current.device)  # the policy may live on another device
        logits = self.cache.follow_event(event, event.semantics if self.follows == "policy" else "rewind")
        self.current = torch.where(active, self._score(logits), self.current)
        return self.current

    @torch.no_grad()
    def rescore(self, ids: Sequence[int]) -> float:
        """The score of one full sequence by a fresh forward (the reference the incremental path must equal)."""
        device = next(self.model.parameters()).device
        logits = self.model(input_ids=torch.tensor([list(ids)], device=device)).logits[:, -1]
        return float(self._score(logits)[0])


class HFProcessReward:
    """A process reward model from Hugging Face, kept incremental (see :class:`IncrementalScorer`).

    The potential Phi(s) of a state is the PRM's score of its visible prefix: of every token by default, or with
    ``step_token_ids`` (say, the newline ids) of the last completed *step*, the longest visible prefix ending in one
    of those tokens (the prompt's score before the first). ``mode="delta"`` (default) rewards each action with
    Phi(s_{t+1}) - Phi(s_t), potential-based shaping (Ng, Harada & Russell 1999), so deleting what the PRM dislikes
    earns back what typing it lost and an episode's sum is the final potential minus the prompt's. ``mode="raw"``
    rewards each action with Phi(s_{t+1}).
    """

    kind = "process"

    def __init__(self, model, name: str = "prm", mode: Literal["delta", "raw"] = "delta", label: int = 1,
                 transform: Literal["sigmoid", "identity"] = "sigmoid", step_token_ids: Sequence[int] | None = None):
        if mode not in ("delta", "raw"):
            raise ValueError(f"mode must be 'delta' or 'raw', got {mode!r}")
        self.name, self.mode = name, mode
        self.scorer = IncrementalScorer(model, label=label, transform=transform)
        self.step_token_ids = None if step_token_ids is None else torch.tensor(sorted(set(step_token_ids)))
        self._steps: list[list[tuple[int, float]]] = []  # per row: (visible length, score) at each completed step
        self.potential: torch.Tensor | None = None  # [B]

    @classmethod
    def from_pretrained(cls, path: str, policy_tokenizer, *, prm_tokenizer=None, dtype: torch.dtype = torch.float32,
                        **kwargs) -> HFProcessReward:
        """Load a saved token-classification PRM (``halluc-rl prm`` writes one) for a policy, refusing it when its
        tokenizer is not the policy's: the PRM reads the policy's token ids as they are, so another vocabulary
        would score other text. ``prm_tokenizer`` defaults to the one saved in ``path``; ``kwargs`` go to the
        constructor (say ``step_token_ids=halluc_rl.labels.step_token_ids(tokenizer)``).
        """
        from transformers import AutoModelForTokenClassification, AutoTokenizer

        prm_tokenizer = prm_tokenizer if prm_tokenizer is not None else AutoTokenizer.from_pretrained(path)
        mismatch = tokenizer_mismatch(prm_tokenizer, policy_tokenizer)
        if mismatch:
            raise ValueError(f"PRM {path} uses tokenizer {_tokenizer_name(prm_tokenizer, path)} but the policy uses "
                             f"{_tokenizer_name(policy_tokenizer, 'its own')}: {mismatch}; train the PRM on the "
                             "policy's tokenizer (halluc-rl prm does)")
        model = AutoModelForTokenClassification.from_pretrained(path, dtype=dtype, use_safetensors=True).eval()
        if model.get_input_embeddings().weight.shape[0] < len(policy_tokenizer):
            raise ValueError(f"PRM {path} has {model.get_input_embeddings().weight.shape[0]} embedding rows for the "
                             f"policy's {len(policy_tokenizer)} tokens; resize its embeddings and train it again")
        return cls(model, **kwargs)

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        prompt_score = self.scorer.start(input_ids, attention_mask).cpu()
        self.potential = prompt_score.clone()
        self._steps = [[(0, float(score))] for score in prompt_score]

    def _step_potential(self, event: StepEvent, scores: torch.Tensor) -> torch.Tensor:
        """Phi per row: push a step when a delimiter is typed, pop the steps a deletion undoes."""
        kinds = event.kinds.cpu()
        typed = (kinds == int(ActionKind.APPEND)) & torch.isin(event.actions.cpu(), self.step_token_ids)
        changed = typed | (kinds == int(ActionKind.DELETE))
        lengths = event.state.lengths.cpu()
        for b in torch.nonzero(changed).flatten().tolist():
            stack = self._steps[b]
            while stack[-1][0] > int(lengths[b]):
                stack.pop()
            if typed[b]:
                stack.append((int(lengths[b]), float(scores[b])))
        return torch.tensor([stack[-1][1] for stack in self._steps])

    def step(self, event: StepEvent) -> torch.Tensor:
        scores = self.scorer.follow(event).cpu()  # the cache follows every action, step delimiter or not
        before = self.potential
        after = scores if self.step_token_ids is None else self._step_potential(event, scores)
        active = event.active.cpu()
        self.potential = torch.where(active, after, before)
        reward = after - before if self.mode == "delta" else after
        return torch.where(active, reward, 0.0)


class OracleProcessReward:
    """The offline task's ground truth as a process reward: its reference solution is the only right answer, so
    every prefix is exactly right or wrong.

    Phi(s) = 1 while the visible answer's text is a prefix of the reference solution (and, once it has ended, equal
    to it), else 0: judged after every token (``granularity="token"``) or only on completed lines, the steps
    (``"step"``). ``mode="delta"`` (default) rewards Phi(s') - Phi(s): -1 for the token that leaves the reference,
    +1 for the backspace that returns to it. ``mode="raw"`` rewards Phi(s'). For tasks whose solutions are unique
    (``ArithmeticTask``); GSM8K has no such oracle. A ``deps`` problem (its question parses,
    :func:`~halluc_rl.data.deps.parse_question`) is judged by its checker instead
    (:func:`~halluc_rl.data.deps_check.check_solution`): every order of its steps is right, not only the reference's.
    """

    kind = "process"

    def __init__(self, tokenizer, name: str = "oracle", mode: Literal["delta", "raw"] = "delta",
                 granularity: Literal["token", "step"] = "token"):
        if mode not in ("delta", "raw") or granularity not in ("token", "step"):
            raise ValueError(f"mode must be delta or raw and granularity token or step, got {mode!r}, {granularity!r}")
        self.tokenizer, self.name, self.mode, self.granularity = tokenizer, name, mode, granularity
        self.references: list[str] = []
        self.questions: list[str | None] = []
        self.potential: torch.Tensor | None = None  # [B]

    def set_problems(self, problems: Sequence[Problem]) -> None:
        self.references = [format_solution(p.solution, self.tokenizer) for p in problems]
        self.questions = [p.question for p in problems]

    def on_track(self, text: str, reference: str, ended: bool = False, question: str | None = None) -> bool:
        """Whether ``text`` (an answer so far) is still right: a prefix of ``reference``, whole once ``ended``; for a
        ``deps`` ``question``, a right solution so far in any valid order (its checker's verdict)."""
        if self.granularity == "step" and not ended:
            text = text[: text.rfind("\n") + 1]
        parsed = parse_question(question) if question is not None else None
        if parsed is not None:
            return check_solution(parsed, text, ended).on_track
        return text.strip() == reference.strip() if ended else reference.startswith(text)

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        if len(self.references) != input_ids.shape[0]:
            raise ValueError(f"the oracle knows {len(self.references)} references for {input_ids.shape[0]} rows; "
                             "call set_problems (RewardMixer.set_problems) first")
        self.potential = torch.ones(input_ids.shape[0])  # an empty answer is on track

    def step(self, event: StepEvent) -> torch.Tensor:
        state, before = event.state, self.potential
        after = before.clone()
        special = set(self.tokenizer.all_special_ids)
        for b in torch.nonzero(event.active.cpu()).flatten().tolist():
            ids = state.visible(b)
            ended = bool(ids) and ids[-1] in special
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            question = self.questions[b] if len(self.questions) == len(self.references) else None
            after[b] = float(self.on_track(text, self.references[b], ended, question))
        self.potential = after
        return after - before if self.mode == "delta" else after


@dataclass
class Shaping:
    """Per-action shaping terms (each a cost, subtracted)."""

    backtrack_cost: float = 0.0
    """Charged for every backtrack."""
    failed_backtrack_penalty: float = 0.0
    """Charged for a backtrack on an empty response."""
    budget_penalty: float = 0.0
    """Charged for every backtrack beyond ``budget``."""
    budget: int | None = None
    """Backtracks allowed per episode (None: unlimited)."""

    def step(self, event: StepEvent) -> dict[str, torch.Tensor]:
        if not (self.backtrack_cost or self.failed_backtrack_penalty or self.budget_penalty):
            return {}  # nothing configured: no work on the rollout's hot path
        kinds = event.kinds.cpu()  # [B]
        is_bt = (kinds == int(ActionKind.DELETE)) | (kinds == int(ActionKind.FAILED))  # [B]
        parts = {}
        if self.backtrack_cost:
            parts["backtrack_cost"] = -self.backtrack_cost * is_bt.float()
        if self.failed_backtrack_penalty:
            parts["failed_backtrack"] = -self.failed_backtrack_penalty * (kinds == int(ActionKind.FAILED)).float()
        if self.budget_penalty and self.budget is not None:
            over = is_bt & (event.state.num_backtracks.cpu() > self.budget)
            parts["budget"] = -self.budget_penalty * over.float()
        return parts


RewardSpec = OutcomeReward | ProcessReward | tuple[Any, float] | Callable[[str, Problem], float]


def _as_reward(spec) -> tuple[Any, float]:
    reward, weight = spec if isinstance(spec, tuple) else (spec, 1.0)
    if not hasattr(reward, "kind") and callable(reward):
        reward = CallableReward(reward)
    if getattr(reward, "kind", None) not in ("outcome", "process"):
        raise TypeError(
            f"{reward!r} is not a reward model: give an object with kind 'outcome' (score(texts, problems)) or "
            "'process' (start(...) and step(event)), or a callable fn(text, problem) -> float"
        )
    return reward, float(weight)


class RewardError(RuntimeError):
    """A reward plug-in raised: the message names the plug-in and the episode that caused it."""


class RewardMixer:
    """Weighted rewards plus shaping, reported part by part. A generation callback (``on_prefill``/``on_step``)."""

    def __init__(self, rewards: Sequence[RewardSpec] | None = None, shaping: Shaping | None = None):
        pairs = [_as_reward(r) for r in (rewards if rewards is not None else [RuleGrader()])]
        names = [r.name for r, _ in pairs]
        if len(set(names)) != len(names):
            raise ValueError(f"reward names must be unique, got {names}; give each model a distinct `name`")
        self.outcome = [(r, w) for r, w in pairs if r.kind == "outcome"]
        self.process = [(r, w) for r, w in pairs if r.kind == "process"]
        self.shaping = shaping or Shaping()
        self.steps: list[dict[str, torch.Tensor]] = []

    def set_problems(self, problems: Sequence[Problem]) -> None:
        """Tell the rewards which problem each row solves (a plug-in with ``set_problems`` gets them too: the
        oracle reads its reference there). Call before each batch's prefill."""
        self._problems = list(problems)
        for reward, _ in self.process + self.outcome:
            if hasattr(reward, "set_problems"):
                reward.set_problems(problems)

    def on_prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        self.steps = []
        for reward, _ in self.process:
            reward.start(input_ids, attention_mask)

    def on_step(self, event: StepEvent) -> None:
        self.steps.append(self.step(event))

    def step(self, event: StepEvent) -> dict[str, torch.Tensor]:
        """Reward parts [B] of one action (process rewards, weighted, and shaping)."""
        parts = {}
        for reward, weight in self.process:
            try:
                parts[reward.name] = weight * torch.as_tensor(reward.step(event), dtype=torch.float32).cpu()
            except Exception as err:
                row = int(torch.nonzero(event.active.cpu()).flatten()[0]) if bool(event.active.any()) else 0
                raise RewardError(
                    f"process reward {reward.name!r} raised {type(err).__name__}: {err} at action {event.step} "
                    f"(episode {row}{self._describe(row)}, visible ids {event.state.visible(row)[-12:]})") from err
        parts.update(self.shaping.step(event))
        return parts

    def finish(self, texts: Sequence[str], problems: Sequence[Problem]) -> dict[str, torch.Tensor]:
        """Outcome parts [B], weighted."""
        parts = {}
        for reward, weight in self.outcome:
            try:
                parts[reward.name] = weight * torch.as_tensor(reward.score(texts, problems), dtype=torch.float32).cpu()
            except Exception as err:
                row = self._first_failing(reward, texts, problems)
                raise RewardError(
                    f"outcome reward {reward.name!r} raised {type(err).__name__}: {err} (episode {row}: question "
                    f"{problems[row].question[:60]!r}, answer {texts[row][-80:]!r})") from err
        return parts

    @staticmethod
    def _first_failing(reward, texts: Sequence[str], problems: Sequence[Problem]) -> int:
        """The first episode that makes ``reward`` raise when scored alone."""
        for i, (text, problem) in enumerate(zip(texts, problems)):
            try:
                reward.score([text], [problem])
            except Exception:
                return i
        return 0

    def _describe(self, row: int) -> str:
        problems = getattr(self, "_problems", None)
        return f": question {problems[row].question[:60]!r}" if problems and row < len(problems) else ""


# ----------------------------------------------------------------------------------------------------------------
# Implicit process rewards, and the tokenizer check of PRMs
# ----------------------------------------------------------------------------------------------------------------


class ImplicitProcessReward:
    """PRIME's implicit process reward (Yuan et al. 2025, "Free Process Rewards without Process Labels"): a policy
    trained with a DPO-style log-ratio objective is a PRM for free. Each action gets

        r_t = beta * (log pi(a_t | s_t) - log pi_ref(a_t | s_t)),

    ``pi`` a PEFT policy and ``pi_ref`` the same weights with the adapter disabled (``model.disable_adapter()``):
    no second copy of the weights. Log-probs are the policy's action distribution under its backtrack head
    (:func:`halluc_rl.losses.action_log_probs`, temperature 1, no decoding masks), so a backtrack is scored like a
    token. A step's reward is the sum over its tokens (:func:`halluc_rl.labels.implicit_step_scores`).

    Incremental like :class:`IncrementalScorer`: two :class:`~halluc_rl.cache.RewindableCache` s follow the
    policy's actions in its semantics (the second runs the model with the adapter disabled), so a backspace costs
    one forward each.
    :meth:`start` puts the model in eval mode, as generation does.
    """

    kind = "process"

    def __init__(self, policy, beta: float, name: str = "implicit"):
        if not hasattr(policy, "disable_adapter"):
            raise TypeError(f"ImplicitProcessReward needs a PEFT policy (the reference is its base, the adapter "
                            f"disabled); got a {type(policy).__name__}")
        from halluc_rl.policy import policy_backtrack

        self.policy, self.beta, self.name = policy, float(beta), name
        self.backtrack_id, self.head = policy_backtrack(policy)
        self.caches: tuple[RewindableCache, RewindableCache] | None = None  # (policy, reference)
        self.log_probs: tuple[torch.Tensor, torch.Tensor] | None = None  # [B, V] each, of the current states

    def _log_probs(self, logits: torch.Tensor) -> torch.Tensor:  # [B, V] -> [B, V] fp32
        from halluc_rl.losses import action_log_probs

        return action_log_probs(logits, self.backtrack_id, self.head)

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        device = next(self.policy.parameters()).device
        ids, mask = input_ids.to(device), attention_mask.to(device)
        self.policy.eval()
        self.caches = (RewindableCache(self.policy), RewindableCache(self.policy))
        policy_logits = self.caches[0].prefill(ids, mask)  # [B, V]
        with self.policy.disable_adapter():
            ref_logits = self.caches[1].prefill(ids, mask)  # [B, V]
        self.log_probs = (self._log_probs(policy_logits), self._log_probs(ref_logits))

    def step(self, event: StepEvent) -> torch.Tensor:
        policy_lp, ref_lp = self.log_probs
        device = policy_lp.device
        actions = event.actions.to(device).unsqueeze(1)  # [B, 1]
        active = event.active.to(device)  # [B]
        ratio = (policy_lp.gather(1, actions) - ref_lp.gather(1, actions)).squeeze(1)  # [B]
        reward = torch.where(active, self.beta * ratio, 0.0)
        new_policy = self._log_probs(self.caches[0].follow_event(event, event.semantics))  # [B, V]
        with self.policy.disable_adapter():
            new_ref = self._log_probs(self.caches[1].follow_event(event, event.semantics))  # [B, V]
        keep = active.unsqueeze(1)  # [B, 1]
        self.log_probs = (torch.where(keep, new_policy, policy_lp), torch.where(keep, new_ref, ref_lp))
        return reward.cpu()

    @torch.no_grad()
    def rescore(self, prompt_ids: Sequence[int], response_ids: Sequence[int]) -> torch.Tensor:
        """The reward [T] of each token of a visible response (no backtracks), by two fresh teacher-forced forwards."""
        device = next(self.policy.parameters()).device
        ids = torch.tensor([[*prompt_ids, *response_ids]], device=device)  # [1, P + T]
        targets = ids[0, len(prompt_ids):].unsqueeze(1)  # [T, 1]
        rows = slice(len(prompt_ids) - 1, ids.shape[1] - 1)  # the logits that predict each response token
        policy_lp = self._log_probs(self.policy(input_ids=ids).logits[0, rows]).gather(1, targets)  # [T, 1]
        with self.policy.disable_adapter():
            ref_lp = self._log_probs(self.policy(input_ids=ids).logits[0, rows]).gather(1, targets)  # [T, 1]
        return (self.beta * (policy_lp - ref_lp)).squeeze(1).cpu()


def _tokenizer_name(tokenizer, fallback: str) -> str:
    return repr(getattr(tokenizer, "name_or_path", "") or fallback)


def tokenizer_mismatch(a, b) -> str | None:
    """Why tokenizers ``a`` and ``b`` give token ids other meanings (None when they agree): the vocabularies
    and the EOS id are compared."""
    va, vb = a.get_vocab(), b.get_vocab()
    if va != vb:
        ia, ib = {i: t for t, i in va.items()}, {i: t for t, i in vb.items()}
        differ = sorted(i for i in set(ia) | set(ib) if ia.get(i) != ib.get(i))
        first = differ[0]
        return (f"the vocabularies differ ({len(va)} vs {len(vb)} tokens, {len(differ)} ids differ; id {first} is "
                f"{ia.get(first)!r} vs {ib.get(first)!r})")
    if a.eos_token_id != b.eos_token_id:
        return f"the EOS ids differ ({a.eos_token_id} vs {b.eos_token_id})"
    return None
