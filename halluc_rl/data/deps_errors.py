"""Errors for ``deps`` training data (SFT and pretraining), by kind and rate: :class:`DepsErrors`.

* ``premature`` - at the start of a line, the name of a needed variable whose inputs are not computed yet (Physics of
  LMs 2.2's "retry_weak" fake mistake), then backtracks over it;
* ``unneeded`` - at the start of a line, the name of a variable the answer does not need;
* ``slip`` - a wrong digit in a value (a substituted input, a result or the final answer).

:class:`DepsSelfErrors` takes the model's *own* order mistakes instead, located by the oracle.

An error is ``randint(*error_length)`` tokens long, counted from the token that holds the name (a leading space the
tokenizer keeps apart comes with it): the name alone at the default ``(1, 1)``, or the name and the first tokens of
that variable's line (a value slip: the wrong digit and the reference tokens after it). The
examples are built like every other source's (:func:`~halluc_rl.data.examples.assemble_example`), so the rewind and
the retry layouts of :class:`~halluc_rl.data.collator.MaskedErrorCollator` train on the same spans. The question is
read back from the prompt's text, so the source needs nothing but (prompt, response) token pairs.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

from halluc_rl.data.deps import DepsQuestion, complete_solution, parse_question
from halluc_rl.data.deps_check import check_solution, first_wrong_token
from halluc_rl.data.errors import PLAUSIBLE_KINDS, ErrorSource, PlausibleErrors, SelfGeneratedErrors
from halluc_rl.data.examples import ErrorPlan
from halluc_rl.data.vocabulary import special_ids, until_special, vocabulary_classes

DEPS_ERROR_KINDS: tuple[str, ...] = ("premature", "unneeded", "slip")
_IN_PROMPT = re.compile(r"Find [a-z] mod \d+ from:(?:\n[a-z] = [^;\n]+;)+")


def check_error_kinds(task: str, kinds: Sequence[str]) -> tuple[str, ...]:
    """The plausible error kinds to type on ``task`` (a task name, settings allowed): ``kinds``, or all the task's
    own when none are given (or, on ``deps``, arithmetic's default list, which the SFT options start from). An
    unknown kind is a one-line ``ValueError`` listing the task's kinds."""
    name = task.partition(":")[0]
    allowed = DEPS_ERROR_KINDS if name == "deps" else PLAUSIBLE_KINDS
    if not kinds or (name == "deps" and list(kinds) == list(PLAUSIBLE_KINDS)):
        return allowed
    unknown = [k for k in kinds if k not in allowed]
    if unknown:
        raise ValueError(f"error_kinds: unknown value {unknown[0]!r} for the {name} task; use one of "
                         f"{', '.join(allowed)}")
    return tuple(kinds)


def plausible_errors(task: str, kinds: Sequence[str], **settings) -> ErrorSource:
    """The plausible errors of ``task`` (the one choice SFT and pretraining share): :class:`DepsErrors` on
    ``deps``, :class:`~halluc_rl.data.errors.PlausibleErrors` elsewhere, of the :func:`check_error_kinds`
    ``kinds``; ``settings`` are the source's (rate, errors, length, seed)."""
    source = DepsErrors if task.partition(":")[0] == "deps" else PlausibleErrors
    return source(check_error_kinds(task, kinds), **settings)


def prompt_question(text: str) -> DepsQuestion | None:
    """The ``deps`` question inside a prompt's text (None if there is none)."""
    match = _IN_PROMPT.search(text)
    return parse_question(match.group(0)) if match else None


class DepsErrors(ErrorSource):
    """Order mistakes (``premature``, ``unneeded``) and value ``slip``\\ s typed into ``deps`` reference solutions.

    ``kinds`` is a non-empty subset of :data:`DEPS_ERROR_KINDS`. Each error is placed at a distinct position drawn
    among those where one of ``kinds`` can go; its kind is drawn among those possible there.
    """

    def __init__(self, kinds: Sequence[str] = DEPS_ERROR_KINDS, error_rate: float = 0.5, max_errors: int = 1,
                 error_length: tuple[int, int] = (1, 1), seed: int = 0) -> None:
        super().__init__(error_rate, max_errors, error_length, seed)
        self.kinds = check_error_kinds("deps", kinds or [""])  # none at all is an error here

    def _line_states(self, question: DepsQuestion, text: str) -> list[tuple[int, str, dict[str, int]]]:
        """Per line of the solution ``text``: (its first character's offset, the line, the values before it)."""
        out, values, offset = [], {}, len(text) - len(text.lstrip())
        for line in text[offset:].split("\n"):
            out.append((offset, line, dict(values)))
            if line[:1] in question.definitions:
                values[line[0]] = question.value(question.definitions[line[0]], values)
            offset += len(line) + 1
        return out

    def _options(self, question: DepsQuestion, state: dict[str, int], kind: str) -> list[str]:
        """The lines (or line beginnings) an order mistake of ``kind`` may start with in ``state``."""
        needed = question.needed()
        names = [n for n in question.order if n not in state]
        if kind == "premature":
            names = [n for n in names if n in needed and not all(i in state for i in question.inputs(n))]
        else:
            names = [n for n in names if n not in needed]
        lines = []
        for name in names:
            ready = all(i in state for i in question.inputs(name))
            lines.append(question.line(name, state) if ready else f"{name} = {question.definitions[name]}")
        return lines

    def _spots(self, question: DepsQuestion, response: list[int], tokenizer) -> dict[int, list[tuple[str, object]]]:
        """Position -> the (kind, option) pairs possible there: a wrong line for order mistakes, a wrong digit token
        for slips."""
        text = tokenizer.decode(response, skip_special_tokens=True)
        states = self._line_states(question, text)
        classes = vocabulary_classes(tokenizer)
        spots: dict[int, list[tuple[str, object]]] = {}
        starts = {offset: state for offset, _, state in states}
        heads = [(offset, offset + (len(f"x = {question.definitions[line[0]]}") if line[:1] in question.definitions
                                    else len("#### ")), offset + len(line)) for offset, line, _ in states]
        for p, token in enumerate(response):
            before = len(tokenizer.decode(response[:p], skip_special_tokens=True))
            piece = tokenizer.decode([token], skip_special_tokens=True)
            name_at = before + len(piece) - len(piece.lstrip())
            if piece.strip() and name_at in starts:
                for kind in ("premature", "unneeded"):
                    if kind in self.kinds:
                        spots.setdefault(p, []).extend((kind, line) for line in
                                                       self._options(question, starts[name_at], kind))
            if "slip" in self.kinds and token in classes.digit_groups and any(
                    head <= name_at < end for _, head, end in heads):
                wrong = [t for t in classes.digit_groups[token] if t != token
                         and int(tokenizer.decode([t]).strip()) < question.mod]
                spots.setdefault(p, []).extend(("slip", t) for t in wrong)
        return {p: options for p, options in spots.items() if options}

    def _tokens(self, response: list[int], p: int, kind: str, option: object, length: int, tokenizer
                ) -> list[int]:
        """The error's tokens at ``p``: a wrong digit and the reference after it, or the first ``length`` tokens of
        the wrong line, encoded alone (with the whitespace the reference's token at ``p`` starts with), as a line
        after a line break is."""
        if kind == "slip":
            return [int(option), *response[p + 1 : p + length]]
        piece = tokenizer.decode([response[p]], skip_special_tokens=True)
        space = piece[: len(piece) - len(piece.lstrip())]
        ids = tokenizer(space + str(option), add_special_tokens=False)["input_ids"]
        named = next(k for k in range(len(ids)) if tokenizer.decode(ids[: k + 1]).strip())  # the token of the name
        return ids[: named + length]

    def plan(self, question: DepsQuestion, response: list[int], tokenizer, rng: random.Random, n: int
             ) -> list[ErrorPlan]:
        """Up to ``n`` errors at distinct positions of ``response``."""
        spots = self._spots(question, response, tokenizer)
        special = special_ids(tokenizer)
        plans: list[ErrorPlan] = []
        for p in sorted(rng.sample(sorted(spots), min(n, len(spots)))):
            kind = rng.choice(sorted({k for k, _ in spots[p]}))
            option = rng.choice([o for k, o in spots[p] if k == kind])
            tokens = until_special(self._tokens(response, p, kind, option, rng.randint(*self.error_length),
                                                tokenizer), special)
            if tokens and tokens[0] != response[p]:
                plans.append((p, tokens))
        return plans

    def plan_batch(
        self, pairs: Sequence[tuple[list[int], list[int]]], tokenizer, rngs: Sequence[random.Random],
        wanted: Sequence[int],
    ) -> list[list[ErrorPlan]]:
        plans: list[list[ErrorPlan]] = []
        for (prompt, response), rng, n in zip(pairs, rngs, wanted):
            question = prompt_question(tokenizer.decode(prompt, skip_special_tokens=True)) if n else None
            plans.append(self.plan(question, response, tokenizer, rng, n) if question is not None else [])
        return plans


class DepsSelfErrors(SelfGeneratedErrors):
    """The model's own mistakes of ``kinds`` (``premature`` by default), found by the oracle.

    An example that gets an error samples an answer (backtracking off). If the checker's first mistake in it is of
    one of ``kinds``, the example keeps the answer's on-track prefix (the model's own valid order), types the token
    where it went wrong (:func:`~halluc_rl.data.deps_check.first_wrong_token`), backtracks over it and finishes with
    a valid completion (:func:`~halluc_rl.data.deps.complete_solution`). Any other sample gives the clean
    reference. :class:`SelfGeneratedErrors` aligns samples to the reference instead, which on ``deps`` counts a
    valid reordering as a mistake.
    """

    def __init__(self, model, kinds: Sequence[str] = ("premature",), **settings) -> None:
        super().__init__(model, **settings)
        self.kinds = tuple(kinds)

    def own_mistake(self, prompt: list[int], sample: list[int], reference: list[int], tokenizer
                    ) -> tuple[list[int], list[ErrorPlan]]:
        """``(response, plan)``: the prefix and a completion with the sample's wrong token planned at its place, or
        ``(reference, [])`` when the sample has no mistake of ``kinds``."""
        match = _IN_PROMPT.search(tokenizer.decode(prompt, skip_special_tokens=True))
        special = special_ids(tokenizer)
        ended = bool(sample) and sample[-1] in special
        if match is None:
            return reference, []
        verdict = check_solution(match.group(0), tokenizer.decode(sample, skip_special_tokens=True), ended)
        wrong = None if verdict.on_track or verdict.kind not in self.kinds else first_wrong_token(
            tokenizer, match.group(0), sample)
        if wrong is None:
            return reference, []
        question, values = parse_question(match.group(0)), {}
        prefix = tokenizer.decode(sample[:wrong], skip_special_tokens=True)
        for line in prefix.split("\n")[:-1]:  # the complete lines before the mistake (each on track)
            if line[:1] in question.definitions:
                values[line[0]] = question.value(question.definitions[line[0]], values)
        rest = complete_solution(question, values).removeprefix("\n" if prefix.endswith("\n") else "")
        end = [reference[-1]] if reference and reference[-1] in special else []
        response = sample[:wrong] + tokenizer(rest, add_special_tokens=False)["input_ids"] + end
        if response[wrong] == sample[wrong]:
            return reference, []
        return response, [(wrong, [sample[wrong]])]

    def plan_responses(
        self, pairs: Sequence[tuple[list[int], list[int]]], tokenizer, rngs: Sequence[random.Random],
        wanted: Sequence[int],
    ) -> list[tuple[list[int], list[ErrorPlan]]]:
        """An error continues the model's own prefix (:meth:`own_mistake`); the other pairs keep the reference."""
        planned = [(response, []) for _, response in pairs]
        for i, sample in self.sample_batch(pairs, tokenizer, rngs, wanted).items():
            planned[i] = self.own_mistake(pairs[i][0], sample, pairs[i][1], tokenizer)
        return planned

    def plan_batch(self, pairs, tokenizer, rngs, wanted) -> list[list[ErrorPlan]]:
        raise NotImplementedError("DepsSelfErrors' errors continue the model's own prefix, not the reference: "
                                  "use make_examples (plan_responses)")
