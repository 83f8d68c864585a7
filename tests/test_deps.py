"""The ``deps`` task: generator, checker (oracle labels), training errors, env, pretraining and bad input."""

from __future__ import annotations

import hashlib
import json

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from transformers import AutoTokenizer

import halluc_rl  # noqa: F401  (registers the envs)
from halluc_rl.agents import pretrain, sft
from halluc_rl.backtrack import backtrack_token_id
from halluc_rl.data.collator import MaskedErrorCollator
from halluc_rl.data.deps import DepsTask, parse_question
from halluc_rl.data.deps_check import check_solution, error_table, first_wrong_token
from halluc_rl.data.deps_errors import DepsErrors
from halluc_rl.data.errors import build_examples
from halluc_rl.data.problems import Problem, encode_problem, format_prompt, format_solution
from halluc_rl.data.tasks import load_problems, parse_task
from halluc_rl.evaluation import backtrack_counts, oracle_judges
from halluc_rl.generation import generate
from halluc_rl.labels import oracle_step_labels, step_ends
from halluc_rl.rewards import OracleProcessReward
from halluc_rl.tiny import build_tiny_model, train_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
X = -100

QUESTION = "Find c mod 10 from:\ne = 4;\nb = a + 4;\na = 3;\nd = b - e;\nc = b * e;"
REFERENCE = "e = 4\na = 3\nb = a + 4 = 3 + 4 = 7\nc = b * e = 7 * 4 = 8\n#### 8"
REORDERED = "a = 3\nb = a + 4 = 3 + 4 = 7\ne = 4\nc = b * e = 7 * 4 = 8\n#### 8"


@pytest.fixture(scope="module")
def deps_tok():
    """A tokenizer trained on deps text (digits and letters one token each, as in a real deps build)."""
    problems = DepsTask().problems("train", 300)
    return train_tokenizer([format_prompt(p.question, None) + format_solution(p.solution, None) for p in problems],
                           vocab_size=300)


# ------------------------------------------------------------------------------------------------ the generator

def solve(question: str) -> tuple[dict[str, str], str, int, dict[str, int]]:
    """An independent solver: (definitions, target, modulus, the value of every variable), by recursion."""
    ask, *lines = question.split("\n")
    target, _, mod = ask.removeprefix("Find ").removesuffix(" from:").partition(" mod ")
    definitions = dict(line.rstrip(";").split(" = ", 1) for line in lines)
    values: dict[str, int] = {}

    def value(name: str) -> int:
        if name not in values:
            tokens = definitions[name].split()
            args = [value(t) if t.isalpha() else int(t) for t in tokens[::2]]
            if len(args) == 1:
                values[name] = args[0] % int(mod)
            else:
                values[name] = eval(f"{args[0]} {tokens[1]} {args[1]}") % int(mod)  # noqa: S307  (+, -, * of ints)
        return values[name]

    for name in definitions:
        value(name)
    return definitions, target, int(mod), values


def needed_by(definitions: dict[str, str], target: str) -> set[str]:
    found, todo = set(), [target]
    while todo:
        name = todo.pop()
        if name not in found:
            found.add(name)
            todo += [t for t in definitions[name].split() if t.isalpha()]
    return found


def test_generator_is_deterministic_and_its_splits_are_disjoint():
    task = DepsTask(seed=3)
    assert task.problems("train", 20) == DepsTask(seed=3).problems("train", 20) == [task[i] for i in range(20)]
    assert task.problems("train", 5) != DepsTask(seed=4).problems("train", 5)
    splits = {s: {p.question for p in task.problems(s, 300)} for s in ("train", "validation", "test")}
    assert not (splits["train"] & splits["validation"]) and not (splits["train"] & splits["test"])
    assert not (splits["validation"] & splits["test"])
    buckets = {s: {int(hashlib.md5(q.encode()).hexdigest(), 16) % 10 for q in splits[s]} for s in splits}
    assert buckets == {"train": set(range(8)), "validation": {8}, "test": {9}}  # a question's split is its hash's
    assert load_problems("deps:vars=5", "test", 3, seed=3) == DepsTask(vars=5, seed=3).problems("test", 3)


@pytest.mark.parametrize("knobs", [{}, {"vars": 9, "min_vars": 7, "steps": 5, "min_steps": 4}, {"mod": 7},
                                   {"vars": 3, "min_vars": 1, "steps": 3, "min_steps": 1}])
def test_every_reference_solution_is_valid_by_an_independent_solver(knobs):
    task = DepsTask(**knobs)
    for problem in task.problems("train", 150) + task.problems("test", 50):
        definitions, target, mod, values = solve(problem.question)
        needed = needed_by(definitions, target)
        assert task.min_vars <= len(definitions) <= task.vars and task.min_steps <= len(needed) <= task.steps
        assert problem.solution.startswith("\n")  # the first line starts after a line break, as in the question
        *lines, final = problem.solution[1:].split("\n")
        done: set[str] = set()
        for line in lines:
            name, rhs, *rest = line.split(" = ")
            inputs = {t for t in rhs.split() if t.isalpha()}
            assert name in needed and name not in done and inputs <= done, (problem.question, line)
            assert rhs == definitions[name] and int(rest[-1] if rest else rhs) == values[name]
            assert all(0 <= int(t) < mod for t in (rest[0].split()[::2] if rest else []))  # substituted values
            done.add(name)
        assert done == needed and final == f"#### {values[target]}" and problem.answer == str(values[target])


# ------------------------------------------------------------------------------------------------ the oracle

@pytest.mark.parametrize("text, ended, step, at, kind", [
    ("a = 3\nc", False, 1, "c", "premature"),
    ("e = 4\na = 3\nb = a + 4 = 3 + 4 = 7\nd", False, 3, "d", "unneeded"),
    ("e = 4\na = 3\nb = a + 4 = 3 + 4 = 8", False, 2, "8", "slip"),
    ("e = 4\na = 3\nb = a + 4 = 5", False, 2, "5", "slip"),
    ("e = 4\na = 3\nb = a + 5", False, 2, "5", "copy"),
    ("e = 4\ne", False, 1, "e", "repeat"),
    ("e = 4\na = 3", True, 2, None, "incomplete"),
    ("e = 4\n####", False, 1, "#", "incomplete"),
    ("e = 4\na = 3\nb = a + 4\n", False, 2, None, "incomplete"),
    (REFERENCE[:-1] + "9", False, 4, "9", "slip"),
    (REFERENCE + "\n", False, 5, None, "malformed"),
])
def test_the_oracle_finds_the_first_wrong_step_where_and_of_what_kind(text, ended, step, at, kind):
    verdict = check_solution(QUESTION, " " + text, ended)
    last = text.rfind("\n") + 1
    where = 1 + (last + text[last:].index(at) if at else len(text))  # the first `at` of the last line
    assert (verdict.on_track, verdict.step, verdict.kind) == (False, step, kind)
    assert verdict.char == where - (at is None and kind == "malformed") - (text.endswith("4\n"))


def test_every_valid_order_is_right_and_every_prefix_of_one_is_on_track():
    for solution in (REFERENCE, REORDERED, "a = 3\ne = 4\nb = a + 4 = 3 + 4 = 7\nc = b * e = 7 * 4 = 8\n#### 8"):
        assert check_solution(QUESTION, " " + solution, ended=True).on_track
        assert all(check_solution(QUESTION, " " + solution[:k]).on_track for k in range(len(solution)))
    assert not check_solution(QUESTION, " " + REORDERED[:-2], ended=True).on_track


def test_oracle_reward_labels_and_tokens_accept_a_reordering_and_catch_a_premature_step(deps_tok):
    problem = Problem(QUESTION, REFERENCE, "8")
    oracle = OracleProcessReward(deps_tok)
    assert oracle.on_track(" " + REORDERED, " " + REFERENCE, True, QUESTION)
    assert not oracle.on_track(" " + REORDERED, " " + REFERENCE, True)  # the reference prefix alone refuses it
    eos, nl = deps_tok.eos_token_id, deps_tok("\n", add_special_tokens=False)["input_ids"]
    good = [*deps_tok(" " + REORDERED, add_special_tokens=False)["input_ids"], eos]
    assert oracle_step_labels(deps_tok, problem, good, step_ends(good, set(nl), {eos})) == [1] * 5
    bad_text = " a = 3\nc = b * e = 7 * 4 = 8\n#### 8"
    bad = [*deps_tok(bad_text, add_special_tokens=False)["input_ids"], eos]
    assert oracle_step_labels(deps_tok, problem, bad, step_ends(bad, set(nl), {eos})) == [1, 0, 0]
    first = first_wrong_token(deps_tok, QUESTION, bad)
    assert deps_tok.decode(bad[:first]) == " a = 3\n" and deps_tok.decode([bad[first]]).strip() == "c"
    assert first_wrong_token(deps_tok, QUESTION, good) is None


def test_eval_counts_a_deletion_after_a_valid_reordering_as_false_not_precise(deps_tok):
    torch.manual_seed(0)
    model = build_tiny_model(vocab_size=len(deps_tok), hidden_size=32, num_layers=1, heads=2)
    problem = Problem(QUESTION, REFERENCE, "8")
    prompt, reference = encode_problem(problem, deps_tok)
    bt = deps_tok.convert_tokens_to_ids("<|BACKTRACK|>")
    reordered = deps_tok(" " + REORDERED, add_special_tokens=False)["input_ids"]
    forced = [*reordered[:3], bt, reordered[2], deps_tok("c", add_special_tokens=False)["input_ids"][0], bt]
    out = generate(model, deps_tok, [prompt], max_new_tokens=len(forced), backtrack_id=bt, eos_token_id=[],
                   forced_actions=torch.tensor([forced]), loop_guard=None)
    by_reference = backtrack_counts(out, [reference]).metrics()
    by_checker = backtrack_counts(out, [reference], oracle_judges(deps_tok, [problem])).metrics()
    assert by_reference["backtrack_precision"] == 1.0  # off the reference text from the first token
    assert by_checker["backtrack_precision"] == 0.5  # the reordering is right; the premature 'c' was not
    assert by_checker["precise_deletions_malformed"] == 1  # ' ac': the 'c' broke the line 'a = 3'
    assert by_checker["backtrack_precision_nontrivial"] == 0.5  # no trivial case to leave out
    assert "precise_deletions_malformed" not in by_reference  # no oracle, no kinds


def test_eval_names_the_kind_of_each_mistake_a_backtrack_deletes(deps_tok):
    """Precision by error kind: a copy mistake, a premature line and a premature line naming the asked-for
    variable (the trivial case, kept apart from the nontrivial precision) are each deleted once."""
    torch.manual_seed(0)
    model = build_tiny_model(vocab_size=len(deps_tok), hidden_size=32, num_layers=1, heads=2)
    problem = Problem(QUESTION, REFERENCE, "8")
    prompt, reference = encode_problem(problem, deps_tok)
    bt = deps_tok.convert_tokens_to_ids("<|BACKTRACK|>")

    def ids(text: str) -> list[int]:
        return deps_tok(text, add_special_tokens=False)["input_ids"]

    forced = [*ids(" e = 5"), bt, *ids("4\nb"), bt, *ids("a = 3\nc"), bt, *ids("b")]
    out = generate(model, deps_tok, [prompt], max_new_tokens=len(forced), backtrack_id=bt, eos_token_id=[],
                   forced_actions=torch.tensor([forced]), loop_guard=None)
    assert deps_tok.decode(out.sequences[0]) == " e = 4\na = 3\nb"  # the trace ran as written
    m = backtrack_counts(out, [reference], oracle_judges(deps_tok, [problem])).metrics()
    assert m["backtrack_precision"] == 1.0 and m["num_deletions"] == 3
    assert {k: v for k, v in m.items() if k.startswith("precise_deletions_") and v} == {
        "precise_deletions_copy": 1, "precise_deletions_premature": 1, "precise_deletions_premature_target": 1}
    assert m["backtrack_precision_nontrivial"] == 1.0


# ------------------------------------------------------------------------------------------------ training errors

def _example(tok, kind: str, index: int = 0, length=(1, 1)):
    problem = DepsTask().problem("train", index)
    source = DepsErrors([kind], error_rate=1.0, max_errors=1, error_length=length)
    return problem, build_examples([problem], tok, source)[0]


@pytest.mark.parametrize("kind", ["premature", "unneeded", "slip"])
def test_the_spans_of_each_error_kind_give_exact_tensors_in_both_layouts(deps_tok, kind):
    problem, example = _example(deps_tok, kind)
    bt = example.backtrack_id
    (p0, p1), (e0, e1) = [(s, e) for k, s, e in example.spans if k == "prompt"][0], [
        (s, e) for k, s, e in example.spans if k == "error"][0]
    ids = example.input_ids
    P, C, E = ids[p0:p1], ids[p1:e0], ids[e0:e1]
    assert ids[e1 : e1 + len(E)] == [bt] * len(E) and [k for k, _, _ in example.spans if k != "correct"] == [
        "prompt", "error", "backtrack", "correction"]  # no correct span when the first token is wrong
    R = ids[e1 + len(E) :]
    assert deps_tok.decode(C + R, skip_special_tokens=True) == " " + problem.solution  # the reference, unchanged
    before, typed = deps_tok.decode(C, skip_special_tokens=True), deps_tok.decode(E, skip_special_tokens=True)
    verdict = check_solution(problem.question, before + typed)
    assert verdict.kind == kind and verdict.char == len(before) + len(typed) - len(typed.lstrip())  # its own token
    assert len(typed.strip()) == 1 and typed.strip().isalpha() == (kind != "slip")  # one name or digit: length 1
    retry = MaskedErrorCollator(pad_token_id=0, layout="retry")([example.to_features()])
    assert retry["input_ids"].tolist() == [ids]
    assert retry["labels"].tolist() == [[X] * len(P) + C + [X] * len(E) + [bt] * len(E) + R]
    rewind = MaskedErrorCollator(pad_token_id=0, backtrack_token_id=bt)([example.to_features()])
    assert rewind["input_ids"].tolist() == [P + C + E + R]
    # labels[i + 1] is the action from the state ending at token i: the correction after the last correct token,
    # a backtrack after each error token
    assert rewind["labels"].tolist() == [[X] * len(P) + C + [R[0]] + [bt] * len(E) + R[1:]]
    n = len(P + C)
    assert rewind["position_ids"].tolist() == [list(range(n + len(E))) + list(range(n, n + len(R)))]


@pytest.mark.parametrize("kind", ["premature", "unneeded", "slip"])
def test_every_error_is_of_its_kind_by_the_checker(deps_tok, kind):
    found = 0
    for index in range(30):
        problem, example = _example(deps_tok, kind, index, length=(1, 4))
        for _, s, e in [span for span in example.spans if span[0] == "error"]:
            text = deps_tok.decode(example.input_ids[example.prompt_length : e], skip_special_tokens=True)
            shown = deps_tok.decode(example.input_ids[example.prompt_length : s], skip_special_tokens=True)
            verdict = check_solution(problem.question, text)
            assert verdict.kind == kind and verdict.char >= len(shown), (problem.question, text)
            found += 1
            if kind == "premature":
                name = text[verdict.char]
                assert name in parse_question(problem.question).needed()
    assert found >= 25


def test_an_unknown_error_kind_lists_the_task_kinds(capsys, tmp_path):
    with pytest.raises(ValueError, match="use one of premature, unneeded, slip"):
        DepsErrors(["digit"])
    assert sft.main(["--task", "deps", "--error_kinds", "typo", "--use_cpu", "true", "--output_dir",
                     str(tmp_path / "sft")]) == 2
    err = capsys.readouterr().err
    assert "error_kinds: unknown value 'typo' for the deps task; use one of premature, unneeded, slip" in err
    assert err.count("\n") == 1
    assert pretrain.main(["--task", "deps", "--error_kinds", "digit", "--output_dir", str(tmp_path / "pt")]) == 2
    assert "use one of premature, unneeded, slip" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ the env

def test_the_deps_env_needs_no_arguments_and_keeps_the_contract(deps_tok):
    env = gym.make("Backtrack-Deps-v0")
    obs, info = env.reset(seed=0)
    assert obs["prompt_length"] > 0 and "Find " in env.unwrapped.problems[0].question
    small = gym.make("Backtrack-Deps-v0", tokenizer=deps_tok, num_problems=30, max_new_tokens=24)
    check_env(small.unwrapped, skip_render_check=True)
    runs = []
    for _ in range(2):
        env = gym.make("Backtrack-Deps-v0", tokenizer=deps_tok, num_problems=30, max_new_tokens=24)
        env.action_space.seed(5)
        obs, _ = env.reset(seed=11)
        steps = [obs["prompt_ids"].tolist()]
        for _ in range(10):
            obs, reward, term, trunc, _ = env.step(env.action_space.sample())
            steps.append((obs["response_ids"].tolist(), reward))
            if term or trunc:
                break
        runs.append(steps)
    assert runs[0] == runs[1]
    vec = gym.make_vec("Backtrack-Deps-v0", num_envs=2, vectorization_mode="sync", tokenizer=deps_tok,
                       num_problems=30, max_new_tokens=24)
    obs, _ = vec.reset(seed=0)
    assert obs["prompt_ids"].shape[0] == 2
    obs, reward, *_ = vec.step(np.array([deps_tok.eos_token_id] * 2))
    assert reward.shape == (2,)
    vec.close()


# ------------------------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("spec, words", [
    ("deps:steps=5,vars=4", "need steps <= vars"),
    ("deps:min_steps=3,steps=2", "need 1 <= min_steps <= steps"),
    ("deps:mod=11", "need 2 <= mod <= 10"),
    ("deps:vars=27", "vars <= 26"),
    ("deps:colour=3", "deps takes vars=N, min_vars=N, steps=N, min_steps=N, mod=N"),
])
def test_knobs_that_cannot_make_a_problem_are_one_line_naming_them(spec, words):
    with pytest.raises(ValueError) as err:
        parse_task(spec)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_bad_knobs_are_one_line_on_the_command_line(capsys, tmp_path):
    assert pretrain.main(["--task", "deps:steps=9,vars=4", "--output_dir", str(tmp_path / "pt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "task: need steps <= vars" in err and "steps=9, vars=4" in err


# ------------------------------------------------------------------------------------------------ pretraining

def test_pretraining_on_deps_runs_on_cpu_and_a_retry_run_saves_its_semantics(tmp_path):
    args = ["--task", "deps:vars=4,steps=2", "--num_train_problems", "64", "--hidden_size", "32", "--num_layers",
            "1", "--heads", "2", "--batch_size", "4", "--max_train_steps", "3", "--eval_every", "3",
            "--eval_problems", "4", "--warmup_steps", "1", "--vocab_size", "300"]
    assert pretrain.main([*args, "--output_dir", str(tmp_path / "base")]) == 0
    history = json.loads((tmp_path / "base" / "log_history.json").read_text())
    assert history[-1]["step"] == 3 and "val_strict_greedy" in history[-1]
    assert "backtrack_semantics" not in json.loads((tmp_path / "base" / "config.json").read_text())
    assert pretrain.main([*args, "--output_dir", str(tmp_path / "retry"), "--error_rate", "1", "--error_kinds",
                          "premature", "--semantics", "retry", "--init", str(tmp_path / "base")]) == 0
    config = json.loads((tmp_path / "retry" / "config.json").read_text())
    assert config["backtrack_semantics"] == "retry" and config["backtrack_token_id"] == 4
    assert pretrain.main([*args, "--output_dir", str(tmp_path / "bad"), "--train_errors", "true"]) == 2
    assert pretrain.main([*args, "--output_dir", str(tmp_path / "named"), "--error_rate", "1", "--error_kinds",
                          "premature", "--init", "tiny-deps"]) == 0  # an embedded model by name
    assert json.loads((tmp_path / "named" / "config.json").read_text())["hidden_size"] == 128
    assert pretrain.main([*args, "--output_dir", str(tmp_path / "v4"), "--split_digits", "false"]) == 0
    tokens = AutoTokenizer.from_pretrained(tmp_path / "v4").tokenize("b = 7")
    assert tokens[-1] == "Ġ7" and AutoTokenizer.from_pretrained(tmp_path / "base").tokenize("b = 7")[-1] == "7"


def test_the_error_table_counts_first_mistakes_by_kind():
    texts = [" " + REORDERED, " a = 3\nc", " e = 4\nd = b - e", " " + REFERENCE[:-1] + "9"]
    table = error_table([QUESTION] * 4, texts, ["8"] * 4)
    assert table["strict"] == 0.25 and table["answer"] == 0.25
    assert table["kinds"]["premature"] == table["kinds"]["unneeded"] == table["kinds"]["slip"] == 1
    assert table["order_share"] == 2 / 3


@pytest.mark.parametrize("layout", ["rewind", "retry"])
def test_sft_trains_on_deps_errors_in_both_layouts(base_dir, tmp_path, layout):
    out = tmp_path / "sft"
    args = ["--model_name_or_path", str(base_dir), "--output_dir", str(out), "--task", "deps", "--num_train_problems",
            "8", "--per_device_train_batch_size", "4", "--report_to", "none", "--use_cpu", "true", "--bf16", "false",
            "--activation_checkpointing", "false", "--disable_tqdm", "true", "--error_rate", "1.0", "--error_kinds",
            "premature", "--max_steps", "1", "--save_strategy", "no", "--layout", layout]
    assert sft.main(args) == 0
    script = sft.SFTScriptArgs(task="deps", error_kinds=["premature"])
    assert isinstance(sft.make_error_source(script, None, 0), DepsErrors)


def test_a_tokenizer_splits_digits_unless_told_not_to():
    corpus = ["b = a + 7; c = 12 * 3"] * 20
    assert train_tokenizer(corpus, vocab_size=300).tokenize(" 7 12") == ["Ġ", "7", "Ġ", "1", "2"]
    assert train_tokenizer(corpus, vocab_size=300, split_digits=False).tokenize(" 7 12") == ["Ġ7", "Ġ12"]


# ------------------------------------------------------------------------------------------------ the embedded model

def test_the_embedded_deps_model_loads_by_name_and_solves_held_out_problems():
    from halluc_rl.modeling import load_model_and_tokenizer

    model, tok, bt = load_model_and_tokenizer("tiny-deps")
    assert bt == backtrack_token_id(tok) and model.config.backtrack_token_id == bt
    problems = load_problems("deps", "validation", 40)
    prompts = [encode_problem(p, tok)[0] for p in problems]
    out = generate(model.eval(), tok, prompts, max_new_tokens=80, backtrack_bias=float("-inf"))
    table = error_table([p.question for p in problems], out.texts, [p.answer for p in problems], out.finished.tolist())
    assert table["strict"] >= 0.4  # docs/tasks.md: 63% on 300 test problems; weights with noise added get 0


def test_embedded_models_are_known_names_recorded_portably_and_say_how_to_rebuild(monkeypatch, tmp_path):
    from halluc_rl import registry

    for name in ("tiny", "tiny-deps", "halluc-rl/tiny-deps"):
        assert registry.is_known_name(name)
        assert registry.portable_model_name(registry.resolve_model_path(name)) == name.removeprefix("halluc-rl/")
    assert not registry.is_known_name("tiny-other")
    monkeypatch.setattr(registry, "ASSETS_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="run `halluc-rl pretrain --task deps"):
        registry.resolve_model_path("tiny-deps")


def test_self_errors_are_the_models_own_premature_steps_then_a_valid_completion():
    from halluc_rl.data.deps_errors import DepsSelfErrors
    from halluc_rl.modeling import load_model_and_tokenizer

    model, tok, bt = load_model_and_tokenizer("tiny-deps")
    problems = load_problems("deps:steps=4", "train", 32)
    source = DepsSelfErrors(model.eval(), ["premature"], error_rate=1.0, seed=0)
    examples = build_examples(problems, tok, source)
    with_error = [(p, e) for p, e in zip(problems, examples) if e.num_errors]
    assert len(with_error) >= 3  # about a quarter of tiny-deps's samples at T=1
    for problem, example in zip(problems, examples):
        visible = tok.decode(example.visible_response(), skip_special_tokens=True)
        assert check_solution(problem.question, visible, True).on_track  # a valid order, not always the reference
    for problem, example in with_error:
        text = {kind: tok.decode(example.input_ids[s:e]) for kind, s, e in example.spans if kind != "prompt"}
        assert check_solution(problem.question, text["correct"], False).on_track
        assert check_solution(problem.question, text["correct"] + text["error"], False).kind == "premature"
        assert [k for k, _, _ in example.spans] == ["prompt", "correct", "error", "backtrack", "correction"]
    script = sft.SFTScriptArgs(task="deps:steps=4", error_source="self", error_kinds=["premature"])
    assert isinstance(sft.make_error_source(script, model, 0), DepsSelfErrors)
