"""Problems to train and evaluate on: the task registry and the one loader every part of the library uses.

Sources:

* :func:`load_gsm8k` (:mod:`halluc_rl.data.gsm8k`) - GSM8K from the Hub or from local jsonl/parquet files;
  ``validation`` is carved out of ``train`` with a fixed seed, so ``test`` is never trained on;
* :class:`ArithmeticTask` (:mod:`halluc_rl.data.arithmetic`) - an offline, seeded generator of GSM8K-shaped
  multi-step word problems (the embedded default task a ~3M-parameter model learns on CPU in minutes);
* :class:`DepsTask` (:mod:`halluc_rl.data.deps`) - an offline, seeded generator of dependency problems (compute
  one variable from shuffled definitions; after Physics of LMs 2.2's iGSM), checked by :mod:`halluc_rl.data.deps_check`;
* :func:`load_reasoning_gym` - optional procedural problems from ``reasoning_gym``.

A task is named by one string (:func:`parse_task`: ``arithmetic:max_value=50``) and loaded by
:func:`load_problems`. Every problem is turned into tokens the same way (:mod:`halluc_rl.data.problems`):
:func:`format_prompt`, :func:`format_solution`, :func:`encode_problem`. The public names of those three modules are
re-exported here, so ``from halluc_rl.data.tasks import ...`` keeps working for all of them.
"""

from __future__ import annotations

import warnings

from halluc_rl.data.arithmetic import (
    CHECK_PREFIXES,
    INVERSE,
    ITEMS,
    NAMES,
    OPERATIONS,
    ArithmeticTask,
    check_line,
)
from halluc_rl.data.deps import DEPS_KNOBS, DepsTask
from halluc_rl.data.gsm8k import (
    GSM8K_HUB_ID,
    load_gsm8k,
    rows_to_problems,
    split_validation,
    validation_count,
)
from halluc_rl.data.problems import (
    PLAIN_TEMPLATE,
    SPLITS,
    Problem,
    encode_problem,
    format_prompt,
    format_solution,
)

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


TASKS: tuple[str, ...] = ("arithmetic", "gsm8k", "deps")
GENERATOR_TASKS: tuple[str, ...] = ("arithmetic", "deps")
"""The offline, seeded, endless tasks (problems are drawn by index; give ``num_problems > 0``)."""
ORACLE_TASKS: tuple[str, ...] = ("arithmetic", "deps")
"""The tasks whose every prefix is exactly right or wrong (:class:`~halluc_rl.rewards.OracleProcessReward`)."""


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
                         "arithmetic:max_value=50,max_steps=4; deps too: deps:vars=8,steps=4)")
    allowed = {"arithmetic": TASK_KNOBS, "deps": dict.fromkeys(DEPS_KNOBS, int)}.get(name, TASK_KNOBS)
    knobs: dict = {}
    for item in filter(None, (o.strip() for o in options.split(","))):
        key, _, value = item.partition("=")
        if name not in GENERATOR_TASKS or key not in allowed or not value.strip().isdigit():
            takes = "deps takes" if name == "deps" else "arithmetic takes"
            raise ValueError(f"task: cannot read {item!r} in {spec!r}; {takes} "
                             f"{', '.join(f'{k}=N' for k in allowed)}")
        knobs[key] = allowed[key](value)
    if name in GENERATOR_TASKS:
        try:
            # settings that do not go together fail here, not when the problems are drawn
            (ArithmeticTask if name == "arithmetic" else DepsTask)(**knobs)
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
    if task == "deps":
        if num_problems == 0:
            raise ValueError("the deps task is endless: give num_problems > 0")
        return DepsTask(seed=seed, **task_kwargs).problems(split, num_problems)
    if task == "gsm8k":
        problems = load_gsm8k(split, data_files=data_files, validation_size=validation_size, seed=seed)
        return problems if num_problems == 0 else problems[:num_problems]
    raise ValueError(f"unknown task {task!r}; use one of {TASKS}")


__all__ = [
    "CHECK_PREFIXES", "DEPS_KNOBS", "GENERATOR_TASKS", "ORACLE_TASKS", "DepsTask", "GSM8K_HUB_ID",
    "GSM8K_TEST_TEMPLATED", "INVERSE", "ITEMS", "NAMES", "OPERATIONS",
    "PLAIN_TEMPLATE", "SPLITS", "TASKS", "TASK_KNOBS", "ArithmeticTask", "Problem", "check_line", "encode_problem",
    "format_prompt", "format_solution", "load_gsm8k", "load_problems", "load_reasoning_gym", "parse_task",
    "rows_to_problems", "split_validation", "task_name", "validation_count",
]
