"""The problem type and the one prompt format every part of the library uses.

Every problem, from any task (:mod:`halluc_rl.data.tasks`), is turned into tokens the same way:
:func:`format_prompt`, :func:`format_solution`, :func:`encode_problem`.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass

SPLITS: tuple[str, ...] = ("train", "validation", "test")

SPLIT_BUCKETS: dict[str, range] = {"train": range(0, 8), "validation": range(8, 9), "test": range(9, 10)}
"""A generated question's split is fixed by a hash of its text (10 buckets), so no question is in two splits."""


def split_bucket(question: str) -> int:
    """The hash bucket (0-9) of a question's text: :data:`SPLIT_BUCKETS` maps buckets to splits."""
    return int(hashlib.md5(question.encode()).hexdigest(), 16) % 10


class GeneratorTask:
    """What every offline generator task shares: problem ``index`` of a split, drawn from a stream seeded by
    ``seed``, the split, the index and the attempt, until its question hashes into the split
    (:func:`split_bucket`); lists, random samples and endless iteration of the train split.

    A task (a dataclass with ``seed`` and ``max_attempts``) implements ``_generate(rng) -> Problem``; its
    ``stream`` prefix keeps its problems apart from another task's with the same seed."""

    stream: str = ""
    seed: int
    max_attempts: int

    def _generate(self, rng: random.Random) -> Problem:
        raise NotImplementedError

    def _sampler(self) -> random.Random:
        """The task's own seeded stream of train indices for :meth:`sample` (made on first use)."""
        if getattr(self, "_sample_rng", None) is None:
            self._sample_rng = random.Random(f"{self.seed}:{self.stream}sample")
        return self._sample_rng

    def problem(self, split: str, index: int) -> Problem:
        """Problem ``index`` of ``split``: the same for the same seed and settings, on any machine."""
        if split not in SPLIT_BUCKETS:
            raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
        for attempt in range(self.max_attempts):
            problem = self._generate(random.Random(f"{self.seed}:{self.stream}{split}:{index}:{attempt}"))
            if split_bucket(problem.question) in SPLIT_BUCKETS[split]:
                return problem
        raise ValueError(f"no {split} problem found in {self.max_attempts} attempts; these settings allow too few")

    def problems(self, split: str, n: int, start: int = 0) -> list[Problem]:
        """Problems ``start .. start + n - 1`` of ``split``."""
        return [self.problem(split, i) for i in range(start, start + n)]

    def sample(self, n: int) -> list[Problem]:
        """``n`` train problems at random indices (the task's own seeded stream; each call draws new ones)."""
        return [self.problem("train", self._sampler().randrange(2**32)) for _ in range(n)]

    def __getitem__(self, index: int) -> Problem:
        """Train problem ``index`` (the task is an endless sequence)."""
        if index < 0:
            raise IndexError("the task is endless: negative indices have no meaning")
        return self.problem("train", index)

    def __iter__(self) -> Iterator[Problem]:
        """Train problems 0, 1, 2, ... without end."""
        index = 0
        while True:
            yield self.problem("train", index)
            index += 1


@dataclass(frozen=True)
class Problem:
    """One problem: the question, a worked solution ending in ``#### N``, and the gold answer ``N`` (no commas)."""

    question: str
    solution: str
    answer: str


# ----------------------------------------------------------------------------------------------------------------
# Prompt format
# ----------------------------------------------------------------------------------------------------------------

PLAIN_TEMPLATE = "Question: {question}\nAnswer:"
"""The prompt when the tokenizer has no chat template; the solution follows after one space."""


def _has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def format_prompt(question: str, tokenizer) -> str:
    """The prompt text: a chat user turn plus generation prompt when the tokenizer has a chat template, else the plain
    template (also for ``tokenizer=None``, e.g. to build a corpus before a tokenizer exists)."""
    if _has_chat_template(tokenizer):
        messages = [{"role": "user", "content": question}]
        # a fixed date: Llama-3 templates otherwise write today's, and prompts would change from day to day
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             date_string="26 Jul 2024")
    return PLAIN_TEMPLATE.format(question=question)


def format_solution(solution: str, tokenizer) -> str:
    """The response text: the solution itself after a chat prompt, with a leading space after the plain prompt."""
    return solution if _has_chat_template(tokenizer) else " " + solution


def encode_problem(problem: Problem, tokenizer) -> tuple[list[int], list[int]]:
    """``(prompt_ids, response_ids)``; the response ends with EOS, which is what generation stops on.

    The prompt gets the tokenizer's special tokens (BOS) only for the plain template: a chat template writes its own.
    """
    chat = _has_chat_template(tokenizer)
    prompt_ids = tokenizer(format_prompt(problem.question, tokenizer), add_special_tokens=not chat)["input_ids"]
    response_ids = tokenizer(format_solution(problem.solution, tokenizer), add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; responses must end with one so generation can stop")
    return list(prompt_ids), [*response_ids, int(tokenizer.eos_token_id)]

