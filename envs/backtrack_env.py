"""Token generation with a backspace, as a Gymnasium environment."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from halluc_rl.backtrack import (
    ActionKind,
    BatchedBacktrackState,
    EpisodeEnd,
    StepEvent,
    backtrack_token_id,
    check_semantics,
    stop_token_ids,
)
from halluc_rl.data.tasks import (
    GENERATOR_TASKS,
    Problem,
    encode_problem,
    format_prompt,
    load_problems,
    task_name,
)
from halluc_rl.rewards import RewardMixer, RewardSpec, Shaping


class BacktrackEnv(gym.Env):
    """
    ## Description

    A language model writes the answer to a math word problem one token at a time, and may press backspace: the
    action ``<|BACKTRACK|>`` deletes the last visible token of the answer (never the prompt). What the model then
    conditions on is the ``semantics``: the visible answer (``rewind``), or every action so far, deleted tokens and
    backspaces included (``retry``); the visible answer is the same in both (:mod:`halluc_rl.backtrack`). The episode is the
    writing of one answer; rewards come from pluggable reward models - a rule grader of the final answer by
    default, process reward models per action, and shaping terms for backtracking.

    The environment does not run the policy. For fast batched rollouts of a policy model with per-row KV-cache
    rewinds use :func:`halluc_rl.rollout.rollout`, which gives the same texts and rewards for the same actions.

    ## Action Space

    ``Discrete(len(tokenizer))``: a token id (an int or NumPy integer; a bool is refused with a ``TypeError``). The
    tokenizer's backtrack id is the backspace; any other id is appended. A backspace on an empty answer is a no-op, counted as a failed backtrack.

    ## Observation Space

    A ``Dict`` of fixed-shape arrays, so observations batch in vector envs:

    | key               | space                                            | meaning                                  |
    |-------------------|--------------------------------------------------|------------------------------------------|
    | `prompt_ids`      | `Box(0, V-1, (max_prompt_tokens,), int64)`       | prompt ids, right-padded with pad id     |
    | `prompt_length`   | `Discrete(max_prompt_tokens + 1)`                | number of prompt ids                     |
    | `response_ids`    | `Box(0, V-1, (max_new_tokens,), int64)`          | visible answer ids, right-padded         |
    | `response_length` | `Discrete(max_new_tokens + 1)`                   | number of visible answer ids             |
    | `action_ids`      | `Box(0, V-1, (max_new_tokens,), int64)`          | every action so far, right-padded        |
    | `num_actions`     | `Discrete(max_new_tokens + 1)`                   | number of actions so far                 |

    What the model conditions on is ``prompt_ids`` followed by ``response_ids`` in ``rewind``, and by
    ``action_ids`` in ``retry``.

    ## Rewards

    The sum of weighted parts, each also reported in ``info["reward_parts"]``: process rewards after every action,
    shaping costs (``backtrack_cost``, ``failed_backtrack_penalty``, ``budget_penalty`` for each backtrack beyond
    ``backtrack_budget``), and outcome rewards on the last step (default: ``correct``, 1.0 when the answer's final
    number equals the gold answer).

    ## Starting State

    A problem drawn with ``self.np_random`` from the split (``options={"index": i}`` picks problem ``i``; any other
    option is refused with a ``ValueError``), an empty answer.

    ## Episode End

    The rule generation applies too (:class:`halluc_rl.backtrack.EpisodeEnd`):

    * Termination: an end-of-sequence id is appended (the tokenizer's EOS plus the generation config's EOS ids, as in
      generation: :func:`halluc_rl.backtrack.stop_token_ids`), or the answer's text ends with one of ``stop_strings``.
    * Truncation: ``max_new_tokens`` actions were taken, backspaces included.

    ## Arguments

    * ``task``: ``"arithmetic"`` (offline generator, the default), ``"deps"`` (offline generator) or ``"gsm8k"``.
    * ``tokenizer``: a tokenizer object or a name/path (default: the embedded tiny model's; ``Backtrack-Deps-v0``
      passes ``tiny-deps``, the embedded deps model's); must know the backtrack token.
    * ``data_files``: local GSM8K jsonl/parquet file(s) or directory (GSM8K; default: the Hub's ``openai/gsm8k``).
    * ``split``: ``train``, ``validation`` or ``test``. ``num_problems``: how many generated problems (default 1000).
    * ``max_new_tokens``: actions per episode (default: twice the longest reference answer of the split, room for
      backtracks). ``max_prompt_tokens``: prompt room (default: the split's longest prompt). Both are sized from the
      data when not given, so every problem of the split resets.
    * ``generation_config``: a ``GenerationConfig`` (or a path) whose ``eos_token_id`` adds stop ids (default: the
      one saved beside a tokenizer given by name). ``eos_token_id``: the stop ids, overriding both.
    * ``backtrack_budget``, ``backtrack_cost``, ``failed_backtrack_penalty``, ``budget_penalty``: shaping.
    * ``rewards``: reward models, each an object, a ``(model, weight)`` pair or a callable ``fn(text, problem)``.
    * ``prompt_format``: ``fn(question, tokenizer) -> str`` (default: the library's one prompt format).
    * ``stop_strings``: extra ends of an answer. ``task_kwargs``: settings of :class:`ArithmeticTask`.
    * ``semantics``: ``"rewind"`` (default) or ``"retry"``: what a process reward that follows the policy (the
      implicit PRM) conditions on, and which observation key is the model's context.
    """

    metadata = {"render_modes": ["ansi"]}

    def __init__(
        self,
        task: str = "arithmetic",
        tokenizer: Any = None,
        data_files: Any = None,
        split: str = "train",
        num_problems: int = 1000,
        max_new_tokens: int | None = None,
        max_prompt_tokens: int | None = None,
        backtrack_budget: int | None = None,
        backtrack_cost: float = 0.0,
        failed_backtrack_penalty: float = 0.0,
        budget_penalty: float = 0.0,
        rewards: Sequence[RewardSpec] | None = None,
        prompt_format: Callable[[str, Any], str] | None = None,
        stop_strings: Sequence[str] = (),
        task_kwargs: dict | None = None,
        problems: Sequence[Problem] | None = None,
        generation_config: Any = None,
        eos_token_id: int | Sequence[int] | None = None,
        render_mode: str | None = None,
        semantics: str = "rewind",
    ):
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be one of {self.metadata['render_modes']}, got {render_mode!r}")
        self.semantics = check_semantics(semantics)
        for name, value in (("max_new_tokens", max_new_tokens), ("max_prompt_tokens", max_prompt_tokens)):
            if value is not None and int(value) <= 0:
                raise ValueError(f"{name} must be a positive number of tokens, got {value}")
        if isinstance(tokenizer, str) or tokenizer is None:
            from halluc_rl.modeling import load_tokenizer
            from halluc_rl.registry import resolve_model_path

            name = tokenizer or "tiny"
            tokenizer = load_tokenizer(name)
            if generation_config is None and (Path(resolve_model_path(name)) / "generation_config.json").exists():
                generation_config = resolve_model_path(name)
        if isinstance(generation_config, (str, Path)):
            from transformers import GenerationConfig

            generation_config = GenerationConfig.from_pretrained(str(generation_config))
        self.tokenizer = tokenizer
        self.backtrack_id = backtrack_token_id(tokenizer)
        stop_ids = stop_token_ids(tokenizer, generation_config, eos_token_id)
        self.stop_ids = frozenset(stop_ids)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.problems = list(problems) if problems is not None else load_problems(
            task, split, num_problems if task_name(task) in GENERATOR_TASKS else 0, data_files, **(task_kwargs or {}))
        if not self.problems:
            raise ValueError(f"no problems in split {split!r} of task {task!r}")
        self.prompt_format = prompt_format
        if max_new_tokens is None or max_prompt_tokens is None:
            longest_prompt, longest_answer = self._longest(self.problems)
            max_prompt_tokens = longest_prompt if max_prompt_tokens is None else max_prompt_tokens
            max_new_tokens = 2 * longest_answer if max_new_tokens is None else max_new_tokens
        self.max_new_tokens, self.max_prompt_tokens = int(max_new_tokens), int(max_prompt_tokens)
        self.stop_strings = tuple(stop_strings)
        self.end = EpisodeEnd(stop_ids, self.stop_strings, self.max_new_tokens, tokenizer)
        self.shaping = Shaping(backtrack_cost, failed_backtrack_penalty, budget_penalty, backtrack_budget)
        self.mixer = RewardMixer(rewards, self.shaping)
        self.render_mode = render_mode

        vocab = len(tokenizer)
        self.action_space = spaces.Discrete(vocab)
        self.observation_space = spaces.Dict({
            "prompt_ids": spaces.Box(0, vocab - 1, (self.max_prompt_tokens,), dtype=np.int64),
            "prompt_length": spaces.Discrete(self.max_prompt_tokens + 1),
            "response_ids": spaces.Box(0, vocab - 1, (self.max_new_tokens,), dtype=np.int64),
            "response_length": spaces.Discrete(self.max_new_tokens + 1),
            "action_ids": spaces.Box(0, vocab - 1, (self.max_new_tokens,), dtype=np.int64),
            "num_actions": spaces.Discrete(self.max_new_tokens + 1),
        })
        self._state: BatchedBacktrackState | None = None
        self._done = True

    # -- helpers ------------------------------------------------------------------------------------------------
    def encode_prompt(self, problem: Problem) -> list[int]:
        """Prompt ids of ``problem`` in the library's one prompt format (or ``prompt_format``)."""
        if self.prompt_format is None:
            return encode_problem(problem, self.tokenizer)[0]
        text = self.prompt_format(problem.question, self.tokenizer)
        bos = getattr(self.tokenizer, "bos_token", None)
        return self.tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"]

    def _longest(self, problems: Sequence[Problem]) -> tuple[int, int]:
        """The longest prompt and reference answer (EOS included) of ``problems``, in tokens."""
        prompts = [len(self.encode_prompt(p)) for p in problems]
        answers = [len(encode_problem(p, self.tokenizer)[1]) for p in problems]
        return max(prompts), max(answers)

    @property
    def visible_ids(self) -> list[int]:
        return self._state.visible(0) if self._state is not None else []

    @property
    def text(self) -> str:
        return self.tokenizer.decode(self.visible_ids, skip_special_tokens=True)

    def _obs(self) -> dict[str, Any]:
        prompt = np.full(self.max_prompt_tokens, self.pad_id, dtype=np.int64)
        prompt[: len(self._prompt)] = self._prompt
        response = np.full(self.max_new_tokens, self.pad_id, dtype=np.int64)
        visible = self.visible_ids
        response[: len(visible)] = visible
        actions = np.full(self.max_new_tokens, self.pad_id, dtype=np.int64)
        actions[: len(self._actions)] = self._actions
        return {"prompt_ids": prompt, "prompt_length": len(self._prompt),
                "response_ids": response, "response_length": len(visible),
                "action_ids": actions, "num_actions": len(self._actions)}

    def _info(self, parts: dict[str, float], popped: list[int]) -> dict[str, Any]:
        s = self._state
        return {
            "text": self.text,
            "popped": popped,
            "num_backtracks": int(s.num_backtracks[0]),
            "num_deleted": int(s.num_deleted[0]),
            "num_failed": int(s.num_failed[0]),
            "reward_parts": parts,
            "answer": self.problem.answer,
        }

    # -- the API ------------------------------------------------------------------------------------------------
    RESET_OPTIONS: tuple[str, ...] = ("index",)
    """The keys ``reset(options=...)`` reads; any other is refused (a misspelt ``indx`` would be ignored)."""

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        unknown = sorted(set(options or {}) - set(self.RESET_OPTIONS), key=str)
        if unknown:
            raise ValueError(f"unknown reset option(s) {unknown}: BacktrackEnv.reset reads only "
                             f"{list(self.RESET_OPTIONS)} (options={{'index': i}} picks problem i)")
        super().reset(seed=seed)
        index = (options or {}).get("index")
        if index is None:
            index = int(self.np_random.integers(len(self.problems)))
        if not 0 <= int(index) < len(self.problems):
            raise ValueError(f"options['index']={index} is out of range: this split has {len(self.problems)} problems")
        self.problem = self.problems[int(index)]
        self._prompt = self.encode_prompt(self.problem)
        if len(self._prompt) > self.max_prompt_tokens:
            raise ValueError(
                f"the prompt has {len(self._prompt)} tokens but max_prompt_tokens={self.max_prompt_tokens}; "
                "raise max_prompt_tokens"
            )
        self._state = BatchedBacktrackState(1, self.max_new_tokens, self.backtrack_id)
        self._steps = 0
        self._actions: list[int] = []
        self._done = False
        ids = torch.tensor([self._prompt])
        self.mixer.set_problems([self.problem])
        self.mixer.on_prefill(ids, torch.ones_like(ids))
        return self._obs(), self._info({}, [])

    def step(self, action):
        if self._state is None:
            raise RuntimeError("Cannot call step() before reset(): call env.reset() first.")
        if self._done:
            raise RuntimeError("The episode has ended (terminated or truncated): call env.reset() to start another.")
        if isinstance(action, (bool, np.bool_)):  # a bool is an int to Python and to Discrete.contains
            raise TypeError(f"invalid action {action!r}: expected a token id (an int in [0, {self.action_space.n})), "
                            "not a bool")
        if not self.action_space.contains(action) and not (
            isinstance(action, (int, np.integer)) and 0 <= int(action) < self.action_space.n
        ):
            raise ValueError(f"invalid action {action!r}: expected a token id in [0, {self.action_space.n})")
        action = int(action)
        actions = torch.tensor([action])
        kinds, deleted = self._state.step(actions)
        self._steps += 1
        self._actions.append(action)
        event = StepEvent(self._steps - 1, actions, kinds, deleted, torch.ones(1, dtype=torch.bool), self._state,
                          self.semantics)
        parts = {k: float(v[0]) for k, v in self.mixer.step(event).items()}
        kind = ActionKind(int(kinds[0]))
        terminated = bool(self.end.terminated(actions, kinds, self._state)[0])  # the rule generation applies
        truncated = self.end.truncated(self._steps, terminated)
        if terminated or truncated:
            self._done = True
            parts.update({k: float(v[0]) for k, v in self.mixer.finish([self.text], [self.problem]).items()})
        popped = [int(deleted[0])] if kind is ActionKind.DELETE else []
        return self._obs(), float(sum(parts.values())), terminated, truncated, self._info(parts, popped)

    def render(self):
        if self.render_mode == "ansi":
            return f"{format_prompt(self.problem.question, self.tokenizer)}{self.text}"
        return None
