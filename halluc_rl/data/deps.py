"""The ``deps`` task (after Physics of LMs 2.2's iGSM): compute one variable from shuffled definitions.

A question defines single-letter variables, each from a constant or from one or two other variables by one small
operation (``+``, ``-``, ``*``, all mod ``mod``), one per line in shuffled order, with distractors the answer does
not need; it first says which variable it asks for::

    Find c mod 10 from:
    e = 4;
    b = a + 4;
    a = 3;
    d = b - e;
    c = b * e;

The reference solution computes only the needed variables, one per line (the first after a line break too), each
after its inputs, then the answer::

    a = 3
    b = a + 4 = 3 + 4 = 7
    e = 4
    c = b * e = 7 * 4 = 8
    #### 8

A line copies its definition (text from the question, up to its ``;``), substitutes the values already computed and
writes the result, so copying is local and the hard part is *which* variable to write next. A definition starts a
line in the question as a solution line does, so (with a BPE tokenizer, where a name after a space is another token)
the token of a name at a line start occurs in the question only where that name is defined: one lookup, never
confused with the name used as an input. Any order in which each
line comes after its inputs is right; the reference takes, among the ready needed variables, the one defined first in
the question. The checker (:func:`check_solution`) reads only the question, never the generator.
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass
from functools import lru_cache

from halluc_rl.data.problems import GeneratorTask, Problem

DEPS_OPERATORS: tuple[str, ...] = ("+", "-", "*")
DEPS_KNOBS: dict[str, str] = {
    "vars": "most variables a question defines", "min_vars": "fewest variables",
    "steps": "most needed variables (solution lines)", "min_steps": "fewest needed variables",
    "mod": "the modulus of all arithmetic (2-10: every value is one digit)",
}
"""The settings a ``deps`` task name can carry (``deps:vars=8,steps=4``), with their meanings."""
NAMES: str = string.ascii_lowercase


@dataclass
class DepsTask(GeneratorTask):
    """Seeded ``deps`` problems: ``min_steps..steps`` needed variables among ``min_vars..vars`` in all, mod ``mod``.

    The same ``problem(split, index)``, ``problems``, ``sample`` and disjoint hash splits as
    :class:`~halluc_rl.data.arithmetic.ArithmeticTask` (:class:`~halluc_rl.data.problems.GeneratorTask`). Knobs that cannot make a problem raise a ``ValueError`` that
    names them.
    """

    vars: int = 6
    min_vars: int = 4
    steps: int = 3
    min_steps: int = 2
    mod: int = 10
    seed: int = 0
    max_attempts: int = 1000
    stream = "deps:"  # not a field: keeps deps problems apart from arithmetic ones of the same seed

    def __post_init__(self) -> None:
        if not 1 <= self.min_steps <= self.steps:
            raise ValueError(f"need 1 <= min_steps <= steps, got min_steps={self.min_steps}, steps={self.steps}")
        if self.steps > self.vars:
            raise ValueError(f"need steps <= vars (the needed variables are among all), got steps={self.steps}, "
                             f"vars={self.vars}")
        if not 1 <= self.min_vars <= self.vars <= len(NAMES):
            raise ValueError(f"need 1 <= min_vars <= vars <= {len(NAMES)} (one letter each), got "
                             f"min_vars={self.min_vars}, vars={self.vars}")
        if not 2 <= self.mod <= 10:
            raise ValueError(f"need 2 <= mod <= 10 (every value one digit), got mod={self.mod}")

    def _definition(self, rng: random.Random, inputs: list[str]) -> str:
        """The right-hand side over ``inputs`` (0: a constant, 1: ``x op k``, 2: ``x op y``)."""
        if not inputs:
            return str(rng.randrange(self.mod))
        op = rng.choice(DEPS_OPERATORS)
        if len(inputs) == 2:
            return f"{inputs[0]} {op} {inputs[1]}"
        low = 2 if op == "*" and self.mod > 2 else 1
        return f"{inputs[0]} {op} {rng.randint(low, self.mod - 1)}"

    def _generate(self, rng: random.Random) -> Problem:
        needed = rng.randint(self.min_steps, self.steps)
        total = rng.randint(max(needed, self.min_vars), self.vars)
        names = rng.sample(NAMES, total)
        inputs: list[list[str]] = [[] for _ in range(total)]
        for i in range(needed - 2, -1, -1):  # every needed variable feeds a later needed one: the target needs all
            consumer = rng.choice([j for j in range(i + 1, needed) if len(inputs[j]) < 2])
            inputs[consumer].append(names[i])
        for j in range(needed, total):  # distractors read anything defined before them (needed ones included)
            inputs[j] = rng.sample(names[:j], min(j, rng.choice((0, 1, 1, 2))))
        for row in inputs:
            rng.shuffle(row)
        definitions = [f"{names[j]} = {self._definition(rng, inputs[j])}" for j in range(total)]
        rng.shuffle(definitions)
        question = f"Find {names[needed - 1]} mod {self.mod} from:" + "".join(f"\n{d};" for d in definitions)
        solution = reference_solution(question)
        return Problem(question, solution, solution.rsplit("#### ", 1)[1])


# ----------------------------------------------------------------------------------------------------------------
# Reading a question: the checker knows only the text
# ----------------------------------------------------------------------------------------------------------------

_DEFINITION = re.compile(r"([a-z]) = (\d|[a-z])(?: ([-+*]) (\d|[a-z]))?")
_QUESTION = re.compile(r"Find ([a-z]) mod (\d+) from:((?:\n[a-z] = [^;\n]+;)+)")


@dataclass(frozen=True)
class DepsQuestion:
    """A parsed ``deps`` question: each variable's right-hand side, its inputs, the target and the modulus."""

    definitions: dict[str, str]
    order: tuple[str, ...]
    target: str
    mod: int

    def inputs(self, name: str) -> tuple[str, ...]:
        """The variables ``name``'s definition reads."""
        return tuple(t for t in self.definitions[name].split(" ") if t.isalpha())

    def needed(self) -> frozenset[str]:
        """The target and every variable it depends on."""
        seen, todo = set(), [self.target]
        while todo:
            name = todo.pop()
            if name not in seen:
                seen.add(name)
                todo.extend(self.inputs(name))
        return frozenset(seen)

    def value(self, expression: str, values: dict[str, int]) -> int:
        """``expression`` (a digit, or ``x op y``) over ``values``, mod :attr:`mod`."""
        parts = [values[t] if t.isalpha() else int(t) for t in expression.split(" ")[::2]]
        if len(parts) == 1:
            return parts[0] % self.mod
        op = expression.split(" ")[1]
        a, b = parts
        return {"+": a + b, "-": a - b, "*": a * b}[op] % self.mod

    def line(self, name: str, values: dict[str, int]) -> str:
        """The solution line of ``name`` given the values computed so far (its inputs among them)."""
        rhs = self.definitions[name]
        if len(rhs.split(" ")) == 1:
            return f"{name} = {rhs}"
        substituted = " ".join(str(values[t]) if t.isalpha() else t for t in rhs.split(" "))
        return f"{name} = {rhs} = {substituted} = {self.value(rhs, values)}"


@lru_cache(maxsize=8192)
def parse_question(question: str) -> DepsQuestion | None:
    """The question's definitions, or None when ``question`` is not a well-formed ``deps`` question (no variable
    defined twice, every input defined, no cycle). Cached: the result is shared, never change it."""
    match = _QUESTION.fullmatch(question.strip())
    if not match:
        return None
    definitions: dict[str, str] = {}
    for text in match.group(3).strip("\n;").split(";\n"):
        definition = _DEFINITION.fullmatch(text)
        if not definition or definition.group(1) in definitions or (definition.group(3) is None
                                                                    and definition.group(2).isalpha()):
            return None
        definitions[definition.group(1)] = text.partition(" = ")[2]
    parsed = DepsQuestion(definitions, tuple(definitions), match.group(1), int(match.group(2)))
    if parsed.target not in definitions or not 2 <= parsed.mod <= 10:
        return None
    if any(i not in definitions for name in definitions for i in parsed.inputs(name)):
        return None
    return parsed if _topological(parsed, parsed.needed()) is not None else None


def _topological(question: DepsQuestion, names: frozenset[str], computed: frozenset[str] = frozenset()
                 ) -> list[str] | None:
    """``names`` not in ``computed`` in the reference order (the ready one defined first, each time, ``computed``
    counting as ready); None on a cycle."""
    done: list[str] = []
    todo = names - computed
    while len(done) < len(todo):
        ready = [n for n in question.order if n in todo and n not in done
                 and all(i in done or i in computed for i in question.inputs(n))]
        if not ready:
            return None
        done.append(ready[0])
    return done


def complete_solution(question: DepsQuestion, values: dict[str, int]) -> str:
    """The rest of a valid solution after lines that computed ``values`` (needed variables only): each needed
    variable not computed yet, the ready one defined first each time, then the answer; every line after a line
    break."""
    values, lines = dict(values), []
    for name in _topological(question, question.needed(), frozenset(values)) or []:
        lines.append(question.line(name, values))
        values[name] = question.value(question.definitions[name], values)
    return "".join(f"\n{line}" for line in [*lines, f"#### {values[question.target]}"])


def reference_solution(question: str) -> str:
    """The reference solution of a ``deps`` question: the needed variables in :func:`_topological` order, every line
    (the first too) after a line break, so a name starts a line in the answer as in the question: the same token."""
    parsed = parse_question(question)
    if parsed is None:
        raise ValueError(f"not a deps question: {question!r}")
    return complete_solution(parsed, {})
