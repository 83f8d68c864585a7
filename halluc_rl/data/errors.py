"""Backtrack training examples: a reference solution with errors typed into it, each deleted and then corrected.

Everything happens in token space. An example is ``prompt`` then the response's action stream: reference tokens, and at
chosen reference positions an ``error`` (wrong tokens), one ``backtrack`` per error token, then the reference goes on
from where the error was typed (the ``correction``). Applying the actions (:func:`halluc_rl.backtrack.apply_actions`)
always gives back the reference response exactly.

Three error sources:

* :class:`RandomTokenErrors` - random vocabulary tokens (special tokens never);
* :class:`PlausibleErrors` - a wrong digit or operator token, or tokens of a later solution step written too early
  (the mistake kinds of "Physics of Language Models, Part 2.2"); on tasks with check lines, also a wrong result that
  its check line exposes (``reveal`` tokens: an error seen only after the fact);
* :class:`SelfGeneratedErrors` - the model's own sampled solutions, aligned to the reference; where they part, the
  model's divergent tokens become the error.

Examples and their spans are built by :mod:`halluc_rl.data.examples`. Token classes (digit, operator, newline,
special) are decided once per vocabulary id (:mod:`halluc_rl.data.vocabulary`); text is never decoded and
re-encoded to find errors, except for a ``check`` error, whose check line needs the numbers of its step (and is used
only where the tokenizer encodes that line alone as it does in context).
"""

from __future__ import annotations

import difflib
import random
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch

from halluc_rl.backtrack import backtrack_token_id
from halluc_rl.data.arithmetic import CHECK_PREFIXES, INVERSE, check_line
from halluc_rl.data.examples import (
    SPAN_KINDS,
    BacktrackExample,
    ErrorPlan,
    Span,
    assemble_example,
    normalize_spans,
    spans_labels_mask,
)
from halluc_rl.data.grading import evaluate
from halluc_rl.data.problems import Problem, encode_problem
from halluc_rl.data.vocabulary import (
    OPERATORS,
    VocabularyClasses,
    special_ids,
    until_special,
    vocabulary_classes,
)
from halluc_rl.generation import generate


class ErrorSource(ABC):
    """Decides which examples get errors and how many; subclasses decide where and which tokens.

    ``error_rate`` is the share of examples given errors; those get ``randint(1, max_errors)`` errors (fewer when the
    response has too few places for them), each ``randint(*error_length)`` tokens long. Example ``key`` is built
    from ``random.Random(f"{name}:{seed}:{key}")``: the same key gives the same example, whatever the order.
    """

    def __init__(
        self, error_rate: float = 0.5, max_errors: int = 1, error_length: tuple[int, int] = (1, 3), seed: int = 0
    ) -> None:
        if not 0.0 <= error_rate <= 1.0:
            raise ValueError(f"error_rate must be in [0, 1], got {error_rate}")
        if max_errors < 1 or not 1 <= error_length[0] <= error_length[1]:
            raise ValueError(f"need max_errors >= 1 and 1 <= min <= max error length, got {max_errors}, {error_length}")
        self.error_rate = error_rate
        self.max_errors = max_errors
        self.error_length = (int(error_length[0]), int(error_length[1]))
        self.seed = seed

    def rng(self, key: object) -> random.Random:
        """The random stream of example ``key``."""
        return random.Random(f"{type(self).__name__}:{self.seed}:{key}")

    def num_errors(self, rng: random.Random, max_errors: int | None = None) -> int:
        """0 for a clean example (probability ``1 - error_rate``), else uniform in ``1..max_errors``."""
        cap = self.max_errors if max_errors is None else max_errors
        return rng.randint(1, cap) if cap >= 1 and rng.random() < self.error_rate else 0

    @abstractmethod
    def plan_batch(
        self, pairs: Sequence[tuple[list[int], list[int]]], tokenizer, rngs: Sequence[random.Random],
        wanted: Sequence[int],
    ) -> list[list[ErrorPlan]]:
        """For each (prompt, response) pair, up to ``wanted[i]`` errors ``(position, tokens)`` in increasing position
        (none where ``wanted[i]`` is 0), drawing from ``rngs[i]``."""

    def make_example(
        self, prompt_ids: Sequence[int], response_ids: Sequence[int], tokenizer, key: object = 0,
        max_errors: int | None = None,
    ) -> BacktrackExample:
        """The example for one (prompt, reference response) pair."""
        return self.make_examples([(prompt_ids, response_ids)], tokenizer, [key], max_errors)[0]

    def make_examples(
        self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], tokenizer, keys: Sequence[object] | None = None,
        max_errors: int | None = None,
    ) -> list[BacktrackExample]:
        """Examples for many pairs; ``keys`` (default ``0..n-1``) seed them one by one; ``max_errors`` overrides the
        source's own cap (the curriculum sets it)."""
        bt = backtrack_token_id(tokenizer)
        keys = list(range(len(pairs))) if keys is None else list(keys)
        if len(keys) != len(pairs):
            raise ValueError(f"{len(keys)} keys for {len(pairs)} pairs")
        pairs = [(list(prompt), list(response)) for prompt, response in pairs]
        rngs = [self.rng(key) for key in keys]
        wanted = [self.num_errors(rng, max_errors) for rng in rngs]
        planned = self.plan_responses(pairs, tokenizer, rngs, wanted)
        return [assemble_example(prompt, response, plan, bt) for (prompt, _), (response, plan) in zip(pairs, planned)]

    def plan_responses(
        self, pairs: Sequence[tuple[list[int], list[int]]], tokenizer, rngs: Sequence[random.Random],
        wanted: Sequence[int],
    ) -> list[tuple[list[int], list[ErrorPlan]]]:
        """``(response, plan)`` per pair: the reference and :meth:`plan_batch`'s errors in it. A source whose errors
        continue another valid response (the model's own prefix) overrides this."""
        plans = self.plan_batch(pairs, tokenizer, rngs, wanted)
        return [(response, plan) for (_, response), plan in zip(pairs, plans)]


class _PositionalSource(ErrorSource):
    """A source that picks distinct positions at random, then asks :meth:`propose` for the tokens."""

    @abstractmethod
    def candidates(self, response: list[int], tokenizer) -> list[int]:
        """Positions where this source can place an error."""

    @abstractmethod
    def propose(self, response: list[int], position: int, length: int, tokenizer, rng: random.Random
                ) -> list[int] | tuple[list[int], int]:
        """Error tokens of about ``length`` typed instead of ``response[position]`` (empty: none possible), or
        ``(tokens, reveal)`` when the last ``reveal`` of them expose the error."""

    def plan(self, response: list[int], tokenizer, rng: random.Random, n: int) -> list[ErrorPlan]:
        """Up to ``n`` errors at distinct random positions of ``response``."""
        spots = self.candidates(response, tokenizer)
        plans: list[ErrorPlan] = []
        for position in sorted(rng.sample(spots, min(n, len(spots)))):
            proposal = self.propose(response, position, rng.randint(*self.error_length), tokenizer, rng)
            tokens, reveal = proposal if isinstance(proposal, tuple) else (proposal, 0)
            if tokens:
                plans.append((position, tokens, reveal) if reveal else (position, tokens))
        return plans

    def plan_batch(
        self, pairs: Sequence[tuple[list[int], list[int]]], tokenizer, rngs: Sequence[random.Random],
        wanted: Sequence[int],
    ) -> list[list[ErrorPlan]]:
        return [self.plan(response, tokenizer, rng, n) if n else []
                for (_, response), rng, n in zip(pairs, rngs, wanted)]


class RandomTokenErrors(_PositionalSource):
    """Errors of random vocabulary tokens, anywhere in the response (special tokens are never drawn)."""

    def candidates(self, response: list[int], tokenizer) -> list[int]:
        return list(range(len(response)))

    def propose(self, response: list[int], position: int, length: int, tokenizer, rng: random.Random) -> list[int]:
        pool = vocabulary_classes(tokenizer).normal_ids
        first = rng.choice(pool)
        while first == response[position]:
            first = rng.choice(pool)
        return [first, *(rng.choice(pool) for _ in range(length - 1))]


PLAUSIBLE_KINDS: tuple[str, ...] = ("digit", "operator", "step", "check")
_STEP_RE = re.compile(r"^\s*(\d+) ([-+*/]) (\d+) = (\d+)\s*$")


class PlausibleErrors(_PositionalSource):
    """Mistakes a solver could make: a wrong digit, a wrong operator, or a later step written too early.

    ``digit``/``operator``: the reference token is swapped for another of the same class and shape, then the reference
    goes on for the rest of the error length (the mistake is noticed a few tokens late). ``step``: at the start of a
    line, the first tokens of a later line are typed (skipping ahead, cf. Physics of LMs 2.2). ``check``: only where a
    step's result is followed by a check line (``ArithmeticTask(check=1)`` or ``check=2``): a digit of the result is
    wrong, the step line ends, and the check line is written from the wrong result, right given it, up to the number
    that misses the step's first operand (the ``reveal``): an error seen only after the fact. In the default rewind
    layout every state of the reveal is later backtracked from, and that label wins
    (:func:`halluc_rl.backtrack.rewind_layout`): the policy learns to delete a result once its check has exposed it,
    with the reveal as input only. The retry layout also trains the reveal's tokens.
    """

    def __init__(
        self, kinds: Sequence[str] = PLAUSIBLE_KINDS, error_rate: float = 0.5, max_errors: int = 1,
        error_length: tuple[int, int] = (1, 3), seed: int = 0,
    ) -> None:
        super().__init__(error_rate, max_errors, error_length, seed)
        unknown = set(kinds) - set(PLAUSIBLE_KINDS)
        if unknown or not kinds:
            raise ValueError(f"kinds must be a non-empty subset of {PLAUSIBLE_KINDS}, got {kinds}")
        self.kinds = tuple(kinds)

    @staticmethod
    def _line_starts(response: list[int], newline_ids: frozenset[int]) -> list[int]:
        return [0] + [i + 1 for i, t in enumerate(response[:-1]) if t in newline_ids]

    def _checked_results(self, response: list[int], tokenizer, classes: VocabularyClasses
                         ) -> dict[int, tuple[int, int, str, int, str]]:
        """Digit tokens of results that a check line follows (the next line undoes the step, with one of
        :data:`~halluc_rl.data.arithmetic.CHECK_PREFIXES`): position -> (first result token, the step's newline,
        operator, operand, the check's prefix). Empty unless ``check`` is a kind and the tokenizer encodes the check
        line alone as in context (so a wrong check's tokens are those generation would see)."""
        if "check" not in self.kinds:
            return {}
        newlines = [i for i, t in enumerate(response) if t in classes.newline_ids]
        found = {}
        for j, end in enumerate(newlines[:-1]):
            start, check_end = (newlines[j - 1] + 1 if j else 0), newlines[j + 1]
            step = _STEP_RE.match(tokenizer.decode(response[start:end]))
            check = tokenizer.decode(response[end + 1 : check_end])
            if not step:
                continue
            a, op, b, c = step.groups()
            prefix = next((p for p in CHECK_PREFIXES.values() if check == f"{p}{c} {INVERSE[op]} {b} = {a}"), None)
            alone = tokenizer(check, add_special_tokens=False)["input_ids"]
            if prefix is None or alone != response[end + 1 : check_end]:
                continue
            first = end
            while first > start and tokenizer.decode([response[first - 1]]).strip().isdigit():
                first -= 1
            if tokenizer.decode(response[first:end]).strip() == c:
                found.update({p: (first, end, op, int(b), prefix) for p in range(first, end)
                              if response[p] in classes.digit_groups})
        return found

    def _wrong_checks(self, response: list[int], position: int, tokenizer, classes: VocabularyClasses,
                      found: tuple[int, int, str, int, str]) -> list[tuple[int, str]]:
        """(wrong token at ``position``, the check line written from the result it makes) for each wrong digit whose
        check is an integer (a leading zero is never written)."""
        first, end, op, operand, prefix = found
        pieces = [tokenizer.decode([t]).strip() for t in response[first:end]]
        options = []
        for wrong in classes.digit_groups[response[position]]:
            digits = tokenizer.decode([wrong]).strip()
            value = "".join([*pieces[: position - first], digits, *pieces[position - first + 1 :]])
            line = check_line(int(value), op, operand, prefix)
            if wrong != response[position] and not line.endswith("None") and (len(value) == 1 or value[0] != "0"):
                options.append((wrong, line))
        return options

    def _kinds_at(self, response: list[int], position: int, classes: VocabularyClasses, starts: list[int],
                  checks: dict | None = None) -> list[str]:
        token = response[position]
        kinds = []
        if "digit" in self.kinds and token in classes.digit_groups:
            kinds.append("digit")
        if "operator" in self.kinds and token in classes.operator_groups:
            kinds.append("operator")
        if "step" in self.kinds and position in starts and any(
            q > position and response[q] != token for q in starts
        ):
            kinds.append("step")
        if checks and position in checks:
            kinds.append("check")
        return kinds

    def candidates(self, response: list[int], tokenizer) -> list[int]:
        classes = vocabulary_classes(tokenizer)
        starts = self._line_starts(response, classes.newline_ids)
        checks = self._checked_results(response, tokenizer, classes)
        return [p for p in range(len(response)) if self._kinds_at(response, p, classes, starts, checks)]

    def propose(self, response: list[int], position: int, length: int, tokenizer, rng: random.Random
                ) -> list[int] | tuple[list[int], int]:
        classes = vocabulary_classes(tokenizer)
        starts = self._line_starts(response, classes.newline_ids)
        checks = self._checked_results(response, tokenizer, classes)
        kind = rng.choice(self._kinds_at(response, position, classes, starts, checks))
        token = response[position]
        if kind == "check":
            end = checks[position][1]
            options = self._wrong_checks(response, position, tokenizer, classes, checks[position])
            if not options:
                return []
            wrong, line = rng.choice(options)
            reveal = [response[end], *tokenizer(line, add_special_tokens=False)["input_ids"]]  # newline, check line
            return [wrong, *response[position + 1 : end], *reveal], len(reveal)
        if kind == "step":
            later = rng.choice([q for q in starts if q > position and response[q] != token])
            tokens = response[later : later + length]
        else:
            group = (classes.digit_groups if kind == "digit" else classes.operator_groups)[token]
            wrong = rng.choice([t for t in group if t != token])
            tokens = [wrong, *response[position + 1 : position + length]]
        return until_special(tokens, special_ids(tokenizer))


def divergent_spans(sample: Sequence[int], reference: Sequence[int]) -> list[ErrorPlan]:
    """Where ``sample`` leaves ``reference``: ``(reference position, the sample's tokens there)`` per gap.

    Uses ``difflib.SequenceMatcher`` (no autojunk) matching blocks; a gap where the sample only skips reference
    tokens has no sample tokens and is left out, as are gaps past the reference's end.
    """
    matcher = difflib.SequenceMatcher(a=list(sample), b=list(reference), autojunk=False)
    spans: list[ErrorPlan] = []
    a_end = b_end = 0
    for block in matcher.get_matching_blocks():  # ends with the sentinel (len(a), len(b), 0)
        if block.a > a_end and b_end < len(reference):
            spans.append((b_end, [int(t) for t in sample[a_end : block.a]]))
        a_end, b_end = block.a + block.size, block.b + block.size
    return spans


class SelfGeneratedErrors(ErrorSource):
    """Errors the model itself makes: sample a solution (backtracking off), align it to the reference, and use the
    model's divergent tokens as the error at the reference position where it left the reference.

    Samples whose answer grades correct (or equal the reference) give a clean example. Later gaps are taken in order
    up to the example's number of errors; each error is cut to ``error_length[1]`` tokens and before any special
    token. Sampling is batched (``batch_size``) with one ``torch.Generator`` per batch, seeded from the examples'
    keys, so results are reproducible for the same keys and batch size.
    """

    def __init__(
        self, model, error_rate: float = 0.5, max_errors: int = 1, error_length: tuple[int, int] = (1, 8),
        seed: int = 0, temperature: float = 1.0, top_k: int = 0, batch_size: int = 16, extra_tokens: int = 16,
    ) -> None:
        super().__init__(error_rate, max_errors, error_length, seed)
        self.model = model
        self.temperature = temperature
        self.top_k = top_k
        self.batch_size = batch_size
        self.extra_tokens = extra_tokens

    def sample(self, prompts: Sequence[Sequence[int]], tokenizer, max_new_tokens: int, seed: int) -> list[list[int]]:
        """One sampled visible response per prompt (the backtrack token is never sampled)."""
        device = next(self.model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(seed)
        out = generate(self.model, tokenizer, [list(p) for p in prompts], max_new_tokens=max_new_tokens,
                       do_sample=True, temperature=self.temperature, top_k=self.top_k,
                       backtrack_bias=float("-inf"), generator=generator)
        return out.sequences

    def _is_correct(self, sample: list[int], reference: list[int], tokenizer) -> bool:
        if sample == reference:
            return True
        texts = tokenizer.batch_decode([sample, reference], skip_special_tokens=True)
        try:
            return evaluate(texts[0], texts[1])
        except ValueError:  # the reference holds no number: only an exact match counts
            return False

    def plan_from_sample(
        self, sample: list[int], reference: list[int], tokenizer, n: int
    ) -> list[ErrorPlan]:
        """Up to ``n`` errors from the sample's divergent spans (none when the sample is correct)."""
        if self._is_correct(sample, reference, tokenizer):
            return []
        special = special_ids(tokenizer)
        plans = []
        for position, tokens in divergent_spans(sample, reference):
            tokens = until_special(tokens, special)[: self.error_length[1]]
            if tokens and tokens[0] != reference[position]:
                plans.append((position, tokens))
            if len(plans) == n:
                break
        return plans

    def plan_batch(
        self, pairs: Sequence[tuple[list[int], list[int]]], tokenizer, rngs: Sequence[random.Random],
        wanted: Sequence[int],
    ) -> list[list[ErrorPlan]]:
        """Sample the pairs that want errors in batches, then plan each from its sample."""
        plans: list[list[ErrorPlan]] = [[] for _ in pairs]
        for i, sample in self.sample_batch(pairs, tokenizer, rngs, wanted).items():
            plans[i] = self.plan_from_sample(sample, pairs[i][1], tokenizer, wanted[i])
        return plans

    def sample_batch(
        self, pairs: Sequence[tuple[list[int], list[int]]], tokenizer, rngs: Sequence[random.Random],
        wanted: Sequence[int],
    ) -> dict[int, list[int]]:
        """``{pair index: one sampled response}`` for the pairs that want errors, sampled ``batch_size`` at a time
        with a generator seeded from their rngs."""
        seeds = [rng.getrandbits(62) for rng in rngs]
        samples: dict[int, list[int]] = {}
        todo = [i for i, n in enumerate(wanted) if n]
        for b in range(0, len(todo), self.batch_size):
            batch = todo[b : b + self.batch_size]
            max_new_tokens = max(len(pairs[i][1]) for i in batch) + self.extra_tokens
            seed = sum(seeds[i] for i in batch) % 2**62
            samples.update(zip(batch, self.sample([pairs[i][0] for i in batch], tokenizer, max_new_tokens, seed)))
        return samples


def build_examples(
    problems: Sequence[Problem], tokenizer, source: ErrorSource, max_errors: int | None = None, start: int = 0
) -> list[BacktrackExample]:
    """Backtrack examples for ``problems`` (encoded with :func:`encode_problem`); example ``i`` uses key
    ``start + i``, so slices of a problem list build the same examples as the whole list."""
    pairs = [encode_problem(problem, tokenizer) for problem in problems]
    return source.make_examples(pairs, tokenizer, keys=range(start, start + len(pairs)), max_errors=max_errors)


__all__ = [
    "OPERATORS", "PLAUSIBLE_KINDS", "SPAN_KINDS", "BacktrackExample", "ErrorPlan", "ErrorSource", "PlausibleErrors",
    "RandomTokenErrors", "SelfGeneratedErrors", "Span", "VocabularyClasses", "assemble_example", "build_examples",
    "divergent_spans", "normalize_spans", "special_ids", "spans_labels_mask", "vocabulary_classes",
]
