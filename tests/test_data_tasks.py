import copy
import importlib
import json
import re
import subprocess
import sys
import types
import warnings

import pytest

from halluc_rl.data import tasks
from halluc_rl.data.arithmetic import ArithmeticTask
from halluc_rl.data.grading import evaluate
from halluc_rl.data.gsm8k import load_gsm8k, validation_count
from halluc_rl.data.problems import Problem, encode_problem, format_prompt, format_solution
from halluc_rl.data.tasks import load_problems, load_reasoning_gym

ROWS = [
    {"question": "Q1?", "answer": "1 + 1 = <<1+1=2>>2\n#### 2"},
    {"question": "Q2?", "answer": "It is 1,000.\n#### 1,000"},
    {"question": "Q3?", "answer": "no marker here"},
    {"question": "Q4?", "answer": "10 - 11 = -1\n#### -1"},
]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ----------------------------------------------------------------------------------------------------------------
# GSM8K
# ----------------------------------------------------------------------------------------------------------------


def test_gsm8k_splits_from_a_directory(gsm8k_dir):
    train = load_gsm8k("train", gsm8k_dir)
    validation = load_gsm8k("validation", gsm8k_dir)
    test = load_gsm8k("test", gsm8k_dir)
    assert (len(train), len(validation), len(test)) == (7473 - 500, 500, 1319)
    assert not {p.question for p in train} & {p.question for p in validation}
    everything = load_gsm8k("train", gsm8k_dir, validation_size=0)
    assert len(everything) == 7473 and {*train, *validation} == set(everything)
    assert load_gsm8k("validation", gsm8k_dir) == validation  # fixed seed
    assert load_gsm8k("validation", gsm8k_dir, seed=1) != validation
    first = everything[0]
    assert first.answer == "72" and first.solution.endswith("#### 72") and "<<" not in first.solution
    assert all(evaluate(p.solution, p.answer) for p in test)
    assert all("," not in p.answer for p in everything)


def test_gsm8k_keep_calculator_and_dict_and_single_file(gsm8k_dir):
    kept = load_gsm8k("test", {"train": gsm8k_dir / "train.jsonl", "test": gsm8k_dir / "test.jsonl"},
                      keep_calculator=True)
    assert len(kept) == 1319 and "<<" in kept[0].solution
    single = load_gsm8k("test", gsm8k_dir / "test.jsonl")
    assert [p.answer for p in single] == [p.answer for p in kept]


def test_local_rows_are_parsed_and_bad_rows_counted_in_one_warning(tmp_path):
    path = _write_jsonl(tmp_path / "train.jsonl", ROWS)
    with pytest.warns(UserWarning, match="skipped 1 of 4 rows") as record:
        problems = load_gsm8k("train", path, validation_size=1)
    assert len(record) == 1
    assert len(problems) == 2
    with pytest.warns(UserWarning):
        everything = load_gsm8k("test", path)
    assert [p.answer for p in everything] == ["2", "1000", "-1"]
    assert everything[0].solution == "1 + 1 = 2\n#### 2"


def test_parquet_and_validation_file(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.Table.from_pylist([ROWS[0], ROWS[1]]), tmp_path / "train-00000.parquet")
    pq.write_table(pa.Table.from_pylist([ROWS[3]]), tmp_path / "test.parquet")
    _write_jsonl(tmp_path / "validation.jsonl", [ROWS[1]])
    assert [p.answer for p in load_gsm8k("train", tmp_path)] == ["2", "1000"]  # nothing carved: a file is given
    assert [p.answer for p in load_gsm8k("validation", tmp_path)] == ["1000"]
    assert [p.answer for p in load_gsm8k("test", tmp_path)] == ["-1"]


def test_nothing_parseable_names_column_and_format(tmp_path):
    path = _write_jsonl(tmp_path / "test.jsonl", [{"question": "q", "answer": "42"}])
    with pytest.raises(ValueError, match=r"'answer'.*#### N"):
        load_gsm8k("test", path)
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "answer": "#### 1"}])
    with pytest.raises(ValueError, match="'question'"):
        load_gsm8k("test", bad)


def test_malformed_jsonl_line_names_the_file_and_its_line(tmp_path):
    path = tmp_path / "train.jsonl"
    # line 1: a question holding U+2028 (a line separator to str.splitlines, not to JSON lines); line 2 is blank
    good = json.dumps({"question": "Q\u2028?", "answer": "#### 1"}, ensure_ascii=False)
    path.write_text(good + "\n\n" + json.dumps(ROWS[0]) + "\r\n" + '{"question": "Q", "answer": \n', encoding="utf-8")
    with pytest.raises(ValueError) as err:
        load_gsm8k("test", path)
    assert str(err.value) == f"{path}, line 4: malformed JSON (Expecting value, column 29)"
    path.write_text(good + "\n" + json.dumps(ROWS[0]) + "\n\n" + "[1, 2]\n")
    with pytest.raises(ValueError) as err:
        load_gsm8k("test", path)
    assert str(err.value) == f"{path}, line 4: expected a JSON object (one row), got list"
    path.write_text(good + "\n" + json.dumps(ROWS[0]) + "\n")
    assert [(p.question, p.answer) for p in load_gsm8k("test", path)] == [("Q\u2028?", "1"), ("Q1?", "2")]


def test_malformed_json_array_names_the_file_and_its_line(tmp_path):
    path = tmp_path / "test.json"
    path.write_text("[\n" + json.dumps(ROWS[0]) + ",\n" + json.dumps(ROWS[1]) + ",\n" + "{oops}\n]\n")
    with pytest.raises(ValueError) as err:
        load_gsm8k("test", path)
    assert str(err.value) == (f"{path}, line 4: malformed JSON (Expecting property name enclosed in double quotes, "
                              "column 2)")
    path.write_text(json.dumps([ROWS[0], "not a row"]))
    with pytest.raises(ValueError) as err:
        load_gsm8k("test", path)
    assert str(err.value) == f"{path}, item 1: expected a JSON object (one row), got str"
    path.write_text(json.dumps([ROWS[0], ROWS[1]], indent=1))
    assert [p.answer for p in load_gsm8k("test", path)] == ["2", "1000"]


def test_a_first_row_without_answer_does_not_reject_the_file(tmp_path):
    path = _write_jsonl(tmp_path / "test.jsonl", [{"question": "Q0?"}, ROWS[0], ROWS[1]])
    with pytest.warns(UserWarning, match="skipped 1 of 3 rows"):
        problems = load_gsm8k("test", path)
    assert [p.answer for p in problems] == ["2", "1000"]
    nowhere = _write_jsonl(tmp_path / "none.jsonl", [{"question": "Q0?"}, {"question": "Q1?", "solution": "#### 1"}])
    with pytest.raises(ValueError) as err:
        load_gsm8k("test", nowhere)
    assert str(err.value) == f"{nowhere} has no column 'answer' in any row (columns: ['question', 'solution'])"


def test_validation_size_is_capped_for_small_files(tmp_path):
    assert [validation_count(n, 500) for n in (7473, 5000, 50, 5, 2, 1, 0)] == [500, 500, 5, 1, 1, 0, 0]
    assert [validation_count(50, k) for k in (0, 2, 5, 6)] == [0, 2, 5, 5]
    with pytest.raises(ValueError, match="validation_size must be >= 0, got -1"):
        validation_count(50, -1)
    rows = [{"question": f"Q{i}?", "answer": f"#### {i}"} for i in range(30)]
    path = _write_jsonl(tmp_path / "train.jsonl", rows)
    train, validation = load_gsm8k("train", path), load_gsm8k("validation", path)
    assert (len(train), len(validation)) == (27, 3)  # the default 500 capped at 10%
    assert sorted(int(p.answer) for p in train + validation) == list(range(30))
    single = _write_jsonl(tmp_path / "one.jsonl", rows[:1])
    assert [p.answer for p in load_gsm8k("train", single)] == ["0"] and load_gsm8k("validation", single) == []


def test_load_problems_passes_validation_size(tmp_path, gsm8k_dir):
    rows = [{"question": f"Q{i}?", "answer": f"#### {i}"} for i in range(30)]
    path = _write_jsonl(tmp_path / "train.jsonl", rows)
    validation = load_problems("gsm8k", "validation", 0, path, validation_size=2)
    assert validation == load_gsm8k("validation", path, validation_size=2) and len(validation) == 2
    assert len(load_problems("gsm8k", "train", 0, path, validation_size=2)) == 28
    assert len(load_problems("gsm8k", "train", 0, path)) == 27
    assert len(load_problems("gsm8k", "validation", 0, gsm8k_dir)) == 500  # the default for the full file
    assert len(load_problems("gsm8k", "validation", 0, gsm8k_dir, validation_size=100)) == 100
    # the arithmetic task's splits are fixed: validation_size is not passed to ArithmeticTask
    assert load_problems("arithmetic", "validation", 3, validation_size=7) == ArithmeticTask().problems(
        "validation", 3)


def test_missing_files_name_the_path(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_gsm8k("test", missing)
    with pytest.raises(FileNotFoundError, match="no test file in"):
        load_gsm8k("test", tmp_path)
    with pytest.raises(FileNotFoundError, match="'train'"):
        load_gsm8k("validation", {"test": missing})
    with pytest.raises(ValueError, match="unknown split"):
        load_gsm8k("dev", tmp_path)


def test_hub_failure_points_to_data_files(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ConnectionError) as err:
        load_gsm8k("train")
    message = str(err.value)
    assert message.startswith("could not load 'openai/gsm8k' from the Hugging Face Hub (ConnectionError: "
                              "Couldn't reach the Hub). Offline?")
    assert "on the command line --data_files path/to/gsm8k," in message  # the CLI flag of sft, eval, rl
    assert "load_gsm8k(split, data_files='path/to/gsm8k')" in message  # the Python argument


def test_hub_rows_are_used(monkeypatch):
    import datasets

    calls = []

    def fake(*args, **kwargs):
        calls.append((args, kwargs))
        return datasets.Dataset.from_list([ROWS[0], ROWS[1], ROWS[3]])

    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert [p.answer for p in load_gsm8k("test")] == ["2", "1000", "-1"]
    assert len(load_gsm8k("train", validation_size=1)) == 2
    assert calls[0] == (("openai/gsm8k", "main"), {"split": "test"})
    assert calls[1] == (("openai/gsm8k", "main"), {"split": "train"})


# ----------------------------------------------------------------------------------------------------------------
# ArithmeticTask
# ----------------------------------------------------------------------------------------------------------------

LINE = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")


def _check_solution(problem: Problem, task: ArithmeticTask) -> int:
    *steps, last = problem.solution.split("\n")
    assert task.min_steps <= len(steps) <= task.max_steps
    value = None
    for line in steps:
        a, op, b, c = LINE.fullmatch(line).groups()
        a, b, c = int(a), int(b), int(c)
        assert value is None or a == value  # each step works on the previous result
        assert c == {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op] and c >= 0
        assert op != "/" or a % b == 0
        assert str(b) in problem.question or op == "/"  # "shares with 3 friends" divides by 4
        value = c
    assert last == f"#### {value}" and problem.answer == str(value)
    assert evaluate(problem.solution, problem.answer)
    return len(steps)


def test_arithmetic_problems_are_well_formed():
    task = ArithmeticTask()
    problems = task.problems("train", 300)
    counts = {_check_solution(p, task) for p in problems}
    assert counts == {2, 3}
    ops = {m.group(2) for p in problems for m in LINE.finditer(p.solution)}
    assert ops == {"+", "-", "*", "/"}
    assert all(p.question.endswith("have now?") for p in problems)


def test_arithmetic_task_is_seeded_and_splits_are_disjoint():
    task = ArithmeticTask(seed=3)
    assert task.problems("test", 20) == ArithmeticTask(seed=3).problems("test", 20)
    assert task.problems("test", 20) != ArithmeticTask(seed=4).problems("test", 20)
    assert task[5] == task.problem("train", 5) == task.problems("train", 3, start=5)[0]
    questions = {split: {p.question for p in task.problems(split, 400)} for split in ("train", "validation", "test")}
    assert not questions["train"] & questions["validation"]
    assert not questions["train"] & questions["test"]
    assert not questions["validation"] & questions["test"]
    first, second = task.sample(5), task.sample(5)
    assert first != second and ArithmeticTask(seed=3).sample(5) == first


def test_harder_settings_give_longer_problems_with_bigger_numbers():
    hard = ArithmeticTask(min_steps=5, max_steps=6, max_value=500, max_factor=9)
    problems = hard.problems("train", 100)
    assert {_check_solution(p, hard) for p in problems} == {5, 6}
    easy_max = max(int(n) for p in ArithmeticTask().problems("train", 100) for n in re.findall(r"\d+", p.solution))
    hard_max = max(int(n) for p in problems for n in re.findall(r"\d+", p.solution))
    assert easy_max <= 100 < hard_max
    only_add = ArithmeticTask(operations=("add",))
    assert all(" + " in line for p in only_add.problems("train", 20) for line in p.solution.split("\n")[:-1])
    with pytest.raises(ValueError):
        ArithmeticTask(min_steps=3, max_steps=2)
    with pytest.raises(ValueError):
        ArithmeticTask(operations=("pow",))
    with pytest.raises(IndexError):
        ArithmeticTask()[-1]


@pytest.mark.parametrize("check, prefix", [(1, "check "), (2, " ")])
def test_check_lines_undo_each_step_and_keep_questions_answers_and_splits(check, prefix):
    from halluc_rl.data.arithmetic import check_line
    from halluc_rl.data.tasks import load_problems

    plain = ArithmeticTask(seed=2).problems("test", 60)
    checked = load_problems(f"arithmetic:check={check}", "test", 60, seed=2)
    ops = set()
    for p, q in zip(plain, checked):
        assert (q.question, q.answer) == (p.question, p.answer)
        *lines, last = q.solution.split("\n")
        steps, checks = lines[0::2], lines[1::2]
        assert "\n".join([*steps, last]) == p.solution and len(steps) == len(checks)
        for step, check in zip(steps, checks):
            a, op, b, c = LINE.fullmatch(step).groups()
            inverse = {"+": "-", "-": "+", "*": "/", "/": "*"}[op]
            assert check == f"{prefix}{c} {inverse} {b} = {a}"  # undoes the step, back to its first operand
            ops.add(op)
    assert ops == {"+", "-", "*", "/"}
    assert check_line(24, "+", 8) == "check 24 - 8 = 16"  # from a wrong result (23 is right): misses 15
    assert check_line(26, "*", 5, " ") == " 26 / 5 = None"  # no integer: never typed as an error
    with pytest.raises(ValueError, match="check must be 0"):
        ArithmeticTask(check=3)


# ----------------------------------------------------------------------------------------------------------------
# reasoning-gym
# ----------------------------------------------------------------------------------------------------------------


def test_reasoning_gym_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "reasoning_gym", None)
    with pytest.raises(ImportError, match="pip install reasoning-gym"):
        load_reasoning_gym("gsm_symbolic", 3)


def test_reasoning_gym_entries_and_contamination_warning(monkeypatch):
    calls = []

    def create_dataset(name, size, seed):
        calls.append((name, size, seed))
        return [{"question": f"How much is {i} + 1?", "answer": str(i + 1), "metadata": {}} for i in range(size)]

    monkeypatch.setitem(sys.modules, "reasoning_gym", types.SimpleNamespace(create_dataset=create_dataset))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        problems = load_reasoning_gym("gsm_symbolic", 3, seed=7)
        load_reasoning_gym("chain_sum", 2, evaluated_on_gsm8k_test=True)  # not built from GSM8K: no warning
    assert calls[0] == ("gsm_symbolic", 3, 7)
    assert problems[2] == Problem("How much is 2 + 1?", "#### 3", "3")
    with pytest.warns(UserWarning, match="GSM8K's test split"):
        load_reasoning_gym("gsm_symbolic", 3, evaluated_on_gsm8k_test=True)


# ----------------------------------------------------------------------------------------------------------------
# Prompt format
# ----------------------------------------------------------------------------------------------------------------


def test_plain_prompt_format_and_encoding(tokenizer):
    problem = Problem("Tom has 3 apples. How many?", "3 + 4 = 7\n#### 7", "7")
    assert format_prompt(problem.question, tokenizer) == "Question: Tom has 3 apples. How many?\nAnswer:"
    assert format_solution(problem.solution, tokenizer) == " 3 + 4 = 7\n#### 7"
    assert format_prompt(problem.question, None) == format_prompt(problem.question, tokenizer)  # before a tokenizer
    prompt_ids, response_ids = encode_problem(problem, tokenizer)
    assert prompt_ids == tokenizer(format_prompt(problem.question, tokenizer))["input_ids"]
    assert response_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(prompt_ids + response_ids) == tasks.PLAIN_TEMPLATE.format(
        question=problem.question) + " 3 + 4 = 7\n#### 7</s>"


def test_chat_template_prompt_format(tokenizer):
    chat = copy.deepcopy(tokenizer)
    chat.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    problem = Problem("How many cats?", "#### 4", "4")
    prompt = format_prompt(problem.question, chat)
    assert prompt == "<s>user: How many cats?\nassistant:"
    assert format_solution(problem.solution, chat) == "#### 4"
    prompt_ids, response_ids = encode_problem(problem, chat)
    assert prompt_ids == chat(prompt, add_special_tokens=False)["input_ids"]
    assert prompt_ids.count(chat.bos_token_id) == 1  # the template's BOS only
    assert response_ids == [*chat("#### 4", add_special_tokens=False)["input_ids"], chat.eos_token_id]


def test_a_task_name_carries_the_arithmetic_settings():
    from halluc_rl.data.tasks import load_problems, parse_task

    assert parse_task("arithmetic:max_value=50, max_steps=4") == ("arithmetic", {"max_value": 50, "max_steps": 4})
    assert parse_task("gsm8k") == ("gsm8k", {})
    hard = load_problems("arithmetic:min_steps=4,max_steps=4,max_value=50", "test", 3)
    assert hard == ArithmeticTask(min_steps=4, max_steps=4, max_value=50).problems("test", 3)
    assert all(p.solution.count("\n") == 4 for p in hard)  # four steps and the answer line
    for bad, message in (("arithmetic:max_value=big", "cannot read 'max_value=big'"),
                         ("arithmetic:colour=3", "cannot read 'colour=3'"), ("gsm8k:max_value=3", "cannot read"),
                         ("chess", "unknown value 'chess'")):
        with pytest.raises(ValueError, match=message):
            parse_task(bad)


def test_a_bad_task_spec_is_one_line_on_the_command_line(capsys):
    from halluc_rl.agents import evaluate

    assert evaluate.main(["--task", "arithmetic:max_vale=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("halluc-rl eval: task: cannot read 'max_vale=3'") and "max_value=N" in err


SPLIT_HOMES = {
    "problems": ["SPLITS", "PLAIN_TEMPLATE", "Problem", "encode_problem", "format_prompt", "format_solution"],
    "gsm8k": ["GSM8K_HUB_ID", "load_gsm8k", "rows_to_problems", "split_validation", "validation_count"],
    "arithmetic": ["CHECK_PREFIXES", "INVERSE", "ITEMS", "NAMES", "OPERATIONS", "ArithmeticTask", "check_line"],
}
"""Where each name ``halluc_rl.data.tasks`` re-exports is defined."""


def test_tasks_reexports_every_name_from_its_home():
    for module, names in SPLIT_HOMES.items():
        home = importlib.import_module(f"halluc_rl.data.{module}")
        for name in names:
            assert getattr(tasks, name) is getattr(home, name), f"tasks.{name} is not {module}.{name}"
            assert name in tasks.__all__
    import halluc_rl.data as data

    for name in ("Problem", "ArithmeticTask", "load_gsm8k", "load_reasoning_gym", "encode_problem"):
        assert getattr(data, name) is getattr(tasks, name)  # the package's lazy names: the same objects


def test_the_problem_modules_import_only_downward():
    """problems <- gsm8k, arithmetic <- tasks: a lower module never loads a higher one."""
    higher = {"problems": ["gsm8k", "arithmetic", "tasks"], "gsm8k": ["arithmetic", "tasks"],
              "arithmetic": ["gsm8k", "tasks"]}
    for module, above in higher.items():
        code = (f"import sys, halluc_rl.data.{module}; "
                f"print([m for m in {above!r} if 'halluc_rl.data.' + m in sys.modules])")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        assert out.strip() == "[]", f"importing {module} loaded {out.strip()}"
