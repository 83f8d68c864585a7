"""The offline task: seeded, GSM8K-shaped multi-step arithmetic word problems (:class:`ArithmeticTask`).

The embedded default task a ~3M-parameter model learns on CPU in minutes. With ``check=1`` or ``check=2`` each
step is followed by a check line (:func:`check_line`) that exposes a wrong result one line later.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from halluc_rl.data.problems import GeneratorTask, Problem

NAMES: tuple[str, ...] = ("Tom", "Ann", "Maria", "Ben", "Lena", "Omar", "Mia", "Sam", "Nora", "Leo")
ITEMS: tuple[str, ...] = ("apples", "pens", "stickers", "marbles", "books", "cookies", "shells", "cards")
OPERATIONS: tuple[str, ...] = ("add", "sub", "mul", "div")

CHECK_PREFIXES: dict[int, str] = {1: "check ", 2: " "}
"""How a check line starts, by ``ArithmeticTask.check``: 1 the word ``check`` (new tokens to a model pretrained on
the plain format), 2 one space (an indented line of digits and operators only)."""
INVERSE: dict[str, str] = {"+": "-", "-": "+", "*": "/", "/": "*"}


def check_line(result: int, op: str, operand: int, prefix: str = CHECK_PREFIXES[1]) -> str:
    """The line that undoes a step ``a op operand = result``: ``<prefix>result inv operand = a``, computed from
    ``result`` as written (so a wrong result gives a check that misses ``a``; None where that is no integer)."""
    back = {"+": result - operand, "-": result + operand, "*": result / operand, "/": result * operand}[op]
    value = int(back) if float(back).is_integer() and back >= 0 else None
    return f"{prefix}{result} {INVERSE[op]} {operand} = {value}"




@dataclass
class ArithmeticTask(GeneratorTask):
    """Seeded multi-step arithmetic word problems with GSM8K-shaped solutions (``a op b = c`` lines, ``#### N``).

    ``min_steps``/``max_steps`` set the number of operations, ``max_value`` the size of the starting amount and of
    added or removed amounts, ``max_factor`` the largest multiplier or divisor: raise them to make problems a tiny
    model cannot solve. Every intermediate result is a non-negative integer (products stay at most
    ``max_value * max_factor``). Splits are disjoint: a question belongs to exactly one split, by a hash of its text.

    ``check=1`` follows each step ``a op b = c`` with a line that undoes it, ``check c inv b = a`` (``inv`` the inverse
    operation); ``check=2`` writes that line indented by one space instead of the word (:data:`CHECK_PREFIXES`). A
    wrong result then shows on the next line, as a check that does not come back to ``a``: an error a solver can see
    only after the fact, which is where backtracking can help even greedy decoding (docs/efficacy.md). The
    questions, answers and splits are the same as with ``check=0``.
    """

    min_steps: int = 2
    max_steps: int = 3
    max_value: int = 20
    seed: int = 0
    max_factor: int = 5
    operations: tuple[str, ...] = OPERATIONS
    max_attempts: int = 1000
    check: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(f"need 1 <= min_steps <= max_steps, got {self.min_steps}, {self.max_steps}")
        if self.max_value < 1 or self.max_factor < 2:
            raise ValueError("need max_value >= 1 and max_factor >= 2")
        unknown = set(self.operations) - set(OPERATIONS)
        if unknown or not self.operations:
            raise ValueError(f"operations must be a non-empty subset of {OPERATIONS}, got {self.operations}")
        if self.check not in (0, *CHECK_PREFIXES):
            raise ValueError(f"check must be 0 (no check lines), 1 ('check c - b = a' after each step) or 2 (the same "
                             f"line indented, without the word), got {self.check}")

    def _step(self, rng: random.Random, value: int, name: str, item: str) -> tuple[str, str, int, int]:
        """One operation on ``value``: (sentence, operator, operand, result); only feasible operations are drawn."""
        cap = self.max_value * self.max_factor
        feasible = [op for op in self.operations if op == "add"
                    or (op == "sub" and value >= 1)
                    or (op == "mul" and 1 <= value and value * 2 <= cap)
                    or (op == "div" and any(value % k == 0 for k in range(2, self.max_factor + 1)) and value >= 2)]
        op = rng.choice(feasible or ["add"])
        friend = rng.choice([n for n in NAMES if n != name])
        if op == "add":
            k = rng.randint(1, self.max_value)
            sentence = rng.choice([f"{name} buys {k} more {item}.", f"{friend} gives {name} {k} {item}.",
                                   f"{name} finds {k} more {item}."])
            return sentence, "+", k, value + k
        if op == "sub":
            k = rng.randint(1, value)
            sentence = rng.choice([f"{name} gives away {k} {item}.", f"{name} loses {k} {item}.",
                                   f"{name} gives {k} {item} to {friend}."])
            return sentence, "-", k, value - k
        if op == "mul":
            k = rng.randint(2, max(2, min(self.max_factor, cap // value)))
            return f"Then {name} has {k} times as many {item} as before.", "*", k, value * k
        k = rng.choice([d for d in range(2, self.max_factor + 1) if value % d == 0])
        sentence = rng.choice([f"{name} splits the {item} into {k} equal piles and keeps one pile.",
                               f"{name} shares the {item} equally with {k - 1} friend{'s' * (k > 2)} and keeps one share."])
        return sentence, "/", k, value // k

    def _generate(self, rng: random.Random) -> Problem:
        name, item = rng.choice(NAMES), rng.choice(ITEMS)
        value = rng.randint(1, self.max_value)
        sentences, lines = [f"{name} has {value} {item}."], []
        for _ in range(rng.randint(self.min_steps, self.max_steps)):
            sentence, op, k, result = self._step(rng, value, name, item)
            sentences.append(sentence)
            lines.append(f"{value} {op} {k} = {result}")
            if self.check:
                lines.append(check_line(result, op, k, CHECK_PREFIXES[self.check]))
            value = result
        sentences.append(f"How many {item} does {name} have now?")
        return Problem(" ".join(sentences), "\n".join([*lines, f"#### {value}"]), str(value))

