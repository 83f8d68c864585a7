"""Problems to train and evaluate on, and the one prompt format every part of the library uses.

Sources:

* :func:`load_gsm8k` - GSM8K from the Hub or from local jsonl/parquet files; ``validation`` is carved out of
  ``train`` with a fixed seed, so ``test`` is never trained on;
* :class:`ArithmeticTask` - an offline, seeded generator of GSM8K-shaped multi-step word problems (the embedded default
  task a ~3M-parameter model learns on CPU in minutes);
* :func:`load_reasoning_gym` - optional procedural problems from ``reasoning_gym``.

Every problem is turned into tokens the same way: :func:`format_prompt`, :func:`format_solution`,
:func:`encode_problem`.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from halluc_rl.data.grading import extract_hash_answer

SPLITS: tuple[str, ...] = ("train", "validation", "test")
GSM8K_HUB_ID = "openai/gsm8k"
_CALCULATOR_RE = re.compile(r"<<[^>]*>>")


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


# ----------------------------------------------------------------------------------------------------------------
# GSM8K
# ----------------------------------------------------------------------------------------------------------------


def _split_files(directory: Path, split: str) -> list[Path]:
    """Files of ``split`` in a directory: ``{split}.jsonl|json|parquet`` or shards ``{split}-*.{ext}``."""
    found: list[Path] = []
    for ext in ("jsonl", "json", "parquet"):
        found += [directory / f"{split}.{ext}"] if (directory / f"{split}.{ext}").exists() else []
        found += sorted(directory.glob(f"{split}-*.{ext}"))
    return found


def _as_paths(value: str | Path | Sequence[str | Path]) -> list[Path]:
    return [Path(value)] if isinstance(value, (str, Path)) else [Path(v) for v in value]


def _resolve_local(data_files, split: str) -> tuple[list[Path], bool]:
    """The files holding ``split`` (the train files for ``validation`` unless one is given) and whether to carve."""
    source = "test" if split == "test" else "train"
    if isinstance(data_files, Mapping):
        if split == "validation" and "validation" in data_files:
            return _as_paths(data_files["validation"]), False
        if source not in data_files:
            raise FileNotFoundError(f"data_files has no {source!r} entry (keys: {sorted(data_files)})")
        return _as_paths(data_files[source]), "validation" not in data_files
    paths = _as_paths(data_files)
    if len(paths) == 1 and paths[0].is_dir():
        directory = paths[0]
        if split == "validation" and _split_files(directory, "validation"):
            return _split_files(directory, "validation"), False
        files = _split_files(directory, source)
        if not files:
            raise FileNotFoundError(
                f"no {source} file in {directory}: expected {source}.jsonl, {source}.json or {source}.parquet"
            )
        return files, not _split_files(directory, "validation")
    return paths, True  # explicit file(s): the data of the split asked for (train and validation share them)


def _row(value, path: Path, where: str) -> dict:
    """``value`` if it is a JSON object (one row), else a ValueError naming ``path`` and ``where`` it is."""
    if not isinstance(value, dict):
        raise ValueError(f"{path}, {where}: expected a JSON object (one row), got {type(value).__name__}")
    return value


def _read_rows(path: Path) -> list[dict]:
    """Rows of one jsonl, json or parquet file.

    A line that is not valid JSON, or not a JSON object, raises a ValueError naming the file and its 1-based line
    number (blank lines are skipped but counted). Lines are split on ``\\n`` only, so a JSON string holding a
    Unicode line separator (U+2028, U+0085...) stays one row.
    """
    if not path.exists():
        raise FileNotFoundError(f"GSM8K data file not found: {path}")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is not part of the first row
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {err.lineno}: malformed JSON ({err.msg}, column {err.colno})") from err
        return [_row(item, path, f"item {i}") for i, item in enumerate(items)]
    rows = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {number}: malformed JSON ({err.msg}, column {err.colno})") from err
        rows.append(_row(value, path, f"line {number}"))
    return rows


def _hub_rows(split: str) -> list[dict]:
    """Rows of GSM8K's ``train`` or ``test`` split from the Hub, with an offline hint on failure."""
    import datasets

    try:
        dataset = datasets.load_dataset(GSM8K_HUB_ID, "main", split=split)
    except Exception as err:  # offline, rate limited, not found: every failure gets the same hint
        raise ConnectionError(
            f"could not load {GSM8K_HUB_ID!r} from the Hugging Face Hub ({type(err).__name__}: {err}). "
            "Offline? Pass local files: on the command line --data_files path/to/gsm8k, in Python "
            "load_gsm8k(split, data_files='path/to/gsm8k'), with train.jsonl/test.jsonl (or .parquet) in that "
            "directory, or data_files={'train': ..., 'test': ...}."
        ) from err
    return dataset.to_list()


def rows_to_problems(rows: Sequence[Mapping], source: str, keep_calculator: bool = False) -> list[Problem]:
    """Problems from GSM8K-style rows (``question``, ``answer`` ending in ``#### N``); other rows are skipped.

    A column that no row has is an error naming it; rows that lack it while others have it are skipped (and
    counted in one warning). Calculator annotations such as ``<<48/2=24>>`` are removed unless
    ``keep_calculator``: no tool runs them here.
    """
    if rows:
        columns = sorted({key for row in rows for key in row})
        for column in ("question", "answer"):
            if column not in columns:
                raise ValueError(f"{source} has no column {column!r} in any row (columns: {columns})")
    problems: list[Problem] = []
    for row in rows:
        answer, question = row.get("answer"), row.get("question")
        gold = extract_hash_answer(str(answer)) if answer is not None else None
        if gold is None or not question:
            continue
        solution = str(answer) if keep_calculator else _CALCULATOR_RE.sub("", str(answer))
        problems.append(Problem(str(question).strip(), solution.strip(), gold.replace(",", "")))
    if not problems:
        raise ValueError(
            f"no row of {source} has a parseable gold answer: column 'answer' must end with a line '#### N' "
            "(GSM8K format)"
        )
    if len(problems) < len(rows):
        warnings.warn(
            f"skipped {len(rows) - len(problems)} of {len(rows)} rows of {source} without a 'question' or whose "
            "'answer' has no '#### N' line",
            stacklevel=3,
        )
    return problems


def validation_count(num_problems: int, validation_size: int) -> int:
    """How many of ``num_problems`` train problems are carved into validation when ``validation_size`` is asked.

    ``validation_size``, capped at 10% of the problems (at least 1) and so that at least one train problem is left:
    ``min(validation_size, max(1, num_problems // 10), num_problems - 1)``. GSM8K's 7,473 train problems give the
    default 500; a 50-problem file gives 5, a 5-problem file 1, a 1-problem file 0.
    """
    if validation_size < 0:
        raise ValueError(f"validation_size must be >= 0, got {validation_size}")
    return max(0, min(validation_size, max(1, num_problems // 10), num_problems - 1))


def split_validation(
    problems: Sequence[Problem], validation_size: int, seed: int
) -> tuple[list[Problem], list[Problem]]:
    """``(train, validation)``: ``validation_size`` problems drawn with ``random.Random(seed)``, original order kept."""
    if not 0 <= validation_size < len(problems):
        raise ValueError(f"validation_size={validation_size} must be in [0, {len(problems)}) for this train split")
    order = list(range(len(problems)))
    random.Random(seed).shuffle(order)
    held = set(order[:validation_size])
    train = [p for i, p in enumerate(problems) if i not in held]
    validation = [p for i, p in enumerate(problems) if i in held]
    return train, validation


def load_gsm8k(
    split: str,
    data_files: str | Path | Sequence[str | Path] | Mapping[str, str | Path | Sequence[str | Path]] | None = None,
    validation_size: int = 500,
    seed: int = 0,
    keep_calculator: bool = False,
) -> list[Problem]:
    """GSM8K problems of ``split`` (``train``, ``validation`` or ``test``).

    ``data_files`` None loads ``openai/gsm8k`` (config ``main``) from the Hub. Otherwise: a directory holding
    ``train``/``test`` jsonl or parquet files, a dict ``split -> path(s)``, or file(s) holding the asked split's
    data (for ``train``/``validation``, the train data). ``validation`` is carved from train with ``seed`` unless a
    validation file is given; ``train`` is what is left. ``test`` is never carved.

    ``validation_size`` is capped for small files (:func:`validation_count`): at most 10% of the train problems
    (at least one) and always leaving one train problem, so GSM8K's full train file gives 500 and a file of a few
    dozen rows is usable.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
    source_split = "test" if split == "test" else "train"
    if data_files is None:
        rows, carve, source = _hub_rows(source_split), True, f"{GSM8K_HUB_ID} {source_split}"
    else:
        paths, carve = _resolve_local(data_files, split)
        rows = [row for path in paths for row in _read_rows(path)]
        source = ", ".join(str(p) for p in paths)
    problems = rows_to_problems(rows, source, keep_calculator)
    if split == "test" or not carve:
        return problems
    train, validation = split_validation(problems, validation_count(len(problems), validation_size), seed)
    return validation if split == "validation" else train


# ----------------------------------------------------------------------------------------------------------------
# Offline arithmetic word problems
# ----------------------------------------------------------------------------------------------------------------

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


_SPLIT_BUCKETS: dict[str, range] = {"train": range(0, 8), "validation": range(8, 9), "test": range(9, 10)}
"""A question's split is fixed by a hash of its text (10 buckets), so no question is in two splits."""


def _bucket(question: str) -> int:
    return int(hashlib.md5(question.encode()).hexdigest(), 16) % 10


@dataclass
class ArithmeticTask:
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
        self._sample_rng = random.Random(f"{self.seed}:sample")

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

    def problem(self, split: str, index: int) -> Problem:
        """Problem ``index`` of ``split``: the same for the same seed and settings, on any machine."""
        if split not in _SPLIT_BUCKETS:
            raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
        for attempt in range(self.max_attempts):
            problem = self._generate(random.Random(f"{self.seed}:{split}:{index}:{attempt}"))
            if _bucket(problem.question) in _SPLIT_BUCKETS[split]:
                return problem
        raise ValueError(f"no {split} problem found in {self.max_attempts} attempts; these settings allow too few")

    def problems(self, split: str, n: int, start: int = 0) -> list[Problem]:
        """Problems ``start .. start + n - 1`` of ``split``."""
        return [self.problem(split, i) for i in range(start, start + n)]

    def sample(self, n: int) -> list[Problem]:
        """``n`` train problems at random indices (the task's own seeded stream; each call draws new ones)."""
        return [self.problem("train", self._sample_rng.randrange(2**32)) for _ in range(n)]

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


# ----------------------------------------------------------------------------------------------------------------
# reasoning-gym (optional)
# ----------------------------------------------------------------------------------------------------------------

GSM8K_TEST_TEMPLATED: frozenset[str] = frozenset({"gsm_symbolic"})
"""reasoning-gym tasks whose templates were written from GSM8K's test split (GSM-Symbolic)."""


def load_reasoning_gym(
    name: str = "gsm_symbolic", size: int = 500, seed: int = 0, evaluated_on_gsm8k_test: bool = False
) -> list[Problem]:
    """``size`` problems of reasoning-gym task ``name`` (needs ``pip install reasoning-gym``).

    reasoning-gym gives answers, not worked solutions, so each solution is the final line ``#### N``. Set
    ``evaluated_on_gsm8k_test`` when these problems go into training a model that is then scored on GSM8K test:
    for ``gsm_symbolic`` that warns, since its templates come from GSM8K's test split (contamination).
    """
    try:
        import reasoning_gym
    except ImportError as err:
        raise ImportError(
            "load_reasoning_gym needs the optional package reasoning_gym: pip install reasoning-gym"
        ) from err
    if evaluated_on_gsm8k_test and name in GSM8K_TEST_TEMPLATED:
        warnings.warn(
            f"reasoning-gym {name!r} templates are built from GSM8K's test split: training on them and evaluating "
            "on GSM8K test measures memorised templates; evaluate on another split or drop this source",
            stacklevel=2,
        )
    problems = []
    for entry in reasoning_gym.create_dataset(name, size=size, seed=seed):
        answer = str(entry["answer"]).strip()
        problems.append(Problem(str(entry["question"]).strip(), f"#### {answer}", answer.replace(",", "")))
    return problems


TASKS: tuple[str, ...] = ("arithmetic", "gsm8k")


TASK_KNOBS: dict[str, type] = {"min_steps": int, "max_steps": int, "max_value": int, "max_factor": int, "check": int}
"""The :class:`ArithmeticTask` settings a task name can carry: ``arithmetic:max_value=50,max_steps=4``."""


def task_name(spec: str) -> str:
    """The task a spec names, without its settings: ``arithmetic:max_value=50`` -> ``arithmetic``."""
    return spec.partition(":")[0]


def parse_task(spec: str) -> tuple[str, dict]:
    """``"arithmetic:max_value=50,max_steps=4"`` -> ``("arithmetic", {"max_value": 50, "max_steps": 4})``.

    One string names a task variant everywhere a task is named (every trainer's ``task`` option, ``halluc-rl eval
    --task``), so a variant is reproducible from its configs. Raises a one-line ``ValueError`` on a bad spec.
    """
    name, _, options = spec.partition(":")
    if name not in TASKS:
        raise ValueError(f"task: unknown value {name!r}; use one of {', '.join(TASKS)} (arithmetic may carry settings: "
                         "arithmetic:max_value=50,max_steps=4)")
    knobs: dict = {}
    for item in filter(None, (o.strip() for o in options.split(","))):
        key, _, value = item.partition("=")
        if name != "arithmetic" or key not in TASK_KNOBS or not value.strip().isdigit():
            raise ValueError(f"task: cannot read {item!r} in {spec!r}; arithmetic takes "
                             f"{', '.join(f'{k}=N' for k in TASK_KNOBS)}")
        knobs[key] = TASK_KNOBS[key](value)
    if name == "arithmetic":
        try:
            ArithmeticTask(**knobs)  # settings that do not go together fail here, not when the problems are drawn
        except ValueError as err:
            raise ValueError(f"task: {err} in {spec!r}") from err
    return name, knobs


def load_problems(task: str, split: str, num_problems: int, data_files=None, seed: int = 0,
                  validation_size: int = 500, **task_kwargs) -> list[Problem]:
    """The first ``num_problems`` problems of ``task``'s ``split``: the one loader SFT, evaluation and the env use.

    ``task`` may carry settings of :class:`ArithmeticTask` (:func:`parse_task`), as may ``task_kwargs``.
    ``num_problems=0`` means the whole split (GSM8K only: the arithmetic task is endless). ``data_files`` points
    GSM8K at local files (None: the Hub). ``validation_size`` is how many GSM8K train problems are carved into
    validation (capped for small files, see :func:`load_gsm8k`; the arithmetic task's splits are fixed and ignore
    it).
    """
    if num_problems < 0:
        raise ValueError(f"num_problems must be >= 0, got {num_problems}")
    task, knobs = parse_task(task)
    task_kwargs = {**knobs, **task_kwargs}
    if task == "arithmetic":
        if num_problems == 0:
            raise ValueError("the arithmetic task is endless: give num_problems > 0")
        return ArithmeticTask(seed=seed, **task_kwargs).problems(split, num_problems)
    if task == "gsm8k":
        problems = load_gsm8k(split, data_files=data_files, validation_size=validation_size, seed=seed)
        return problems if num_problems == 0 else problems[:num_problems]
    raise ValueError(f"unknown task {task!r}; use one of {TASKS}")
