"""The problem type and the one prompt format every part of the library uses.

Every problem, from any task (:mod:`halluc_rl.data.tasks`), is turned into tokens the same way:
:func:`format_prompt`, :func:`format_solution`, :func:`encode_problem`.
"""

from __future__ import annotations

from dataclasses import dataclass

SPLITS: tuple[str, ...] = ("train", "validation", "test")


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

