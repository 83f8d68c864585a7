"""GSM8K from the Hub or from local jsonl/parquet files.

``validation`` is carved out of ``train`` with a fixed seed (:func:`split_validation`), so ``test`` is never trained
on. :func:`load_gsm8k` is the entry point; :func:`rows_to_problems` turns GSM8K-style rows into :class:`Problem`.
"""

from __future__ import annotations

import json
import random
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

from halluc_rl.data.grading import extract_hash_answer
from halluc_rl.data.problems import SPLITS, Problem

GSM8K_HUB_ID = "openai/gsm8k"
_CALCULATOR_RE = re.compile(r"<<[^>]*>>")


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

