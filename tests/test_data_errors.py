import importlib

import pytest

from halluc_rl.backtrack import apply_actions, backtrack_token_id
from halluc_rl.data import errors
from halluc_rl.data.arithmetic import ArithmeticTask
from halluc_rl.data.errors import (
    PlausibleErrors,
    RandomTokenErrors,
    SelfGeneratedErrors,
    build_examples,
    divergent_spans,
)
from halluc_rl.data.examples import BacktrackExample, assemble_example
from halluc_rl.data.problems import encode_problem
from halluc_rl.data.vocabulary import special_ids, until_special, vocabulary_classes
from tests.conftest import make_model

PROBLEMS = ArithmeticTask(seed=1).problems("train", 24)


pytestmark = pytest.mark.usefixtures("one_thread")


def _errors_with_positions(example: BacktrackExample) -> list[tuple[int, list[int]]]:
    """(reference position, error tokens) of each error, read back from the spans."""
    out, visible = [], 0
    for kind, start, end in example.spans:
        if kind in ("correct", "correction"):
            visible += end - start
        elif kind == "error":
            out.append((visible, example.input_ids[start:end]))
    return out


def _check_structure(example: BacktrackExample, prompt: list[int], response: list[int], bt: int) -> None:
    assert example.input_ids[: len(prompt)] == prompt
    assert example.visible_response() == response
    ends = [0] + [end for _, _, end in example.spans]
    assert [start for _, start, _ in example.spans] == ends[:-1] and ends[-1] == len(example.input_ids)
    kinds = [kind for kind, _, _ in example.spans]
    for i, (kind, start, end) in enumerate(example.spans):
        tokens = example.input_ids[start:end]
        assert end > start
        if kind == "error":
            assert kinds[i + 1] == "backtrack" and kinds[i + 2] == "correction"
            assert example.spans[i + 1][2] - example.spans[i + 1][1] == end - start  # one backtrack per error token
            assert bt not in tokens
        assert (kind == "backtrack") == all(t == bt for t in tokens)
    for position, tokens in _errors_with_positions(example):
        assert tokens[0] != response[position]


def test_assemble_exact_example():
    example = assemble_example([10, 11], [20, 21, 22, 2], [(1, [30, 31]), (3, [32])], backtrack_id=4)
    assert example.input_ids == [10, 11, 20, 30, 31, 4, 4, 21, 22, 32, 4, 2]
    assert example.spans == [("prompt", 0, 2), ("correct", 2, 3), ("error", 3, 5), ("backtrack", 5, 7),
                             ("correction", 7, 9), ("error", 9, 10), ("backtrack", 10, 11), ("correction", 11, 12)]
    assert example.labels_mask() == [False, False, True, False, False, True, True, True, True, False, True, True]
    assert example.labels_mask(train_errors=True) == [False, False] + [True] * 10
    assert example.visible_response() == [20, 21, 22, 2]
    assert example.num_errors == 2 and example.prompt_length == 2
    features = example.to_features()
    assert features["input_ids"] == example.input_ids
    assert features["spans"][2] == {"kind": "error", "start": 3, "end": 5}
    clean = assemble_example([10], [20, 2], [], backtrack_id=4)
    assert clean.spans == [("prompt", 0, 1), ("correct", 1, 3)] and clean.num_errors == 0


@pytest.mark.parametrize(
    "errors",
    [[(0, [20])], [(1, [30]), (1, [31])], [(2, [30]), (1, [31])], [(4, [30])], [(0, [])], [(0, [30, 4])]],
)
def test_assemble_rejects_bad_plans(errors):
    with pytest.raises(ValueError):
        assemble_example([10], [20, 21, 22, 2], errors, backtrack_id=4)


def test_vocabulary_classes(tokenizer):
    classes = vocabulary_classes(tokenizer)
    digit = {d: tokenizer.convert_tokens_to_ids(d) for d in "0123456789"}
    assert set(classes.digit_groups[digit["3"]]) == set(digit.values())
    plus, minus = tokenizer.convert_tokens_to_ids("+"), tokenizer.convert_tokens_to_ids("-")
    assert minus in classes.operator_groups[plus]
    assert not special_ids(tokenizer) & set(classes.normal_ids)
    assert backtrack_token_id(tokenizer) in special_ids(tokenizer) and tokenizer.eos_token_id in special_ids(tokenizer)
    assert tokenizer.convert_tokens_to_ids("Ċ") in classes.newline_ids  # byte-level "\n"
    assert vocabulary_classes(tokenizer) is classes  # classified once


def _source(name, tokenizer):
    if name == "self":
        return SelfGeneratedErrors(make_model("llama", tokenizer), error_rate=1.0, max_errors=3, seed=5)
    cls = {"random": RandomTokenErrors, "plausible": PlausibleErrors}[name]
    return cls(error_rate=1.0, max_errors=3, error_length=(1, 4), seed=5)


@pytest.mark.parametrize("name", ["random", "plausible", "self"])
def test_every_source_keeps_the_reference_visible(tokenizer, name):
    source = _source(name, tokenizer)
    bt = backtrack_token_id(tokenizer)
    examples = build_examples(PROBLEMS, tokenizer, source)
    special = special_ids(tokenizer)
    for problem, example in zip(PROBLEMS, examples):
        prompt, response = encode_problem(problem, tokenizer)
        _check_structure(example, prompt, response, bt)
        assert 1 <= example.num_errors <= 3
        assert not any(set(tokens) & special for _, tokens in _errors_with_positions(example))
    assert max(e.num_errors for e in examples) > 1
    again = build_examples(PROBLEMS, tokenizer, _source(name, tokenizer))
    assert [e.input_ids for e in again] == [e.input_ids for e in examples]  # reproducible


def test_seed_keys_and_error_rate(tokenizer):
    a = build_examples(PROBLEMS, tokenizer, RandomTokenErrors(error_rate=1.0, seed=0))
    b = build_examples(PROBLEMS, tokenizer, RandomTokenErrors(error_rate=1.0, seed=1))
    assert [e.input_ids for e in a] != [e.input_ids for e in b]
    part = build_examples(PROBLEMS[5:9], tokenizer, RandomTokenErrors(error_rate=1.0, seed=0), start=5)
    assert [e.input_ids for e in part] == [e.input_ids for e in a[5:9]]  # example i depends on its key only
    assert all(e.num_errors == 0 for e in build_examples(PROBLEMS, tokenizer, RandomTokenErrors(error_rate=0.0)))
    many = ArithmeticTask().problems("train", 300)
    half = build_examples(many, tokenizer, RandomTokenErrors(error_rate=0.5, max_errors=4))
    share = sum(e.num_errors > 0 for e in half) / len(half)
    assert 0.4 < share < 0.6
    assert {e.num_errors for e in half} == {0, 1, 2, 3, 4}
    capped = build_examples(many[:50], tokenizer, RandomTokenErrors(error_rate=1.0, max_errors=4), max_errors=1)
    assert {e.num_errors for e in capped} == {1}


def test_random_error_lengths(tokenizer):
    examples = build_examples(PROBLEMS, tokenizer, RandomTokenErrors(error_rate=1.0, max_errors=3,
                                                                    error_length=(2, 3)))
    lengths = {len(tokens) for e in examples for _, tokens in _errors_with_positions(e)}
    assert lengths == {2, 3}


@pytest.mark.parametrize("kind", ["digit", "operator", "step"])
def test_plausible_error_kinds(tokenizer, kind):
    classes = vocabulary_classes(tokenizer)
    source = PlausibleErrors(kinds=(kind,), error_rate=1.0, max_errors=2, error_length=(1, 3))
    newline = classes.newline_ids
    found = 0
    for problem, example in zip(PROBLEMS, build_examples(PROBLEMS, tokenizer, source)):
        _, response = encode_problem(problem, tokenizer)
        for position, tokens in _errors_with_positions(example):
            found += 1
            if kind == "step":
                assert position == 0 or response[position - 1] in newline  # at the start of a line
                starts = [q for q in range(position + 1, len(response)) if response[q - 1] in newline]
                assert any(response[q : q + len(tokens)] == tokens for q in starts)  # a later line, too early
            else:
                group = (classes.digit_groups if kind == "digit" else classes.operator_groups)[response[position]]
                assert tokens[0] in group and tokens[0] != response[position]
                assert tokens[1:] == response[position + 1 : position + len(tokens)]  # noticed a little late
    assert found >= len(PROBLEMS)


@pytest.mark.parametrize("check, prefix", [(1, "check "), (2, " ")])
def test_check_errors_are_revealed_by_a_check_written_from_the_wrong_result(tokenizer, check, prefix):
    """``check`` errors on a task with check lines: a wrong result digit (masked), then the rest of the line and the
    check line computed from the wrong result (``reveal``, trained), whose number misses the step's first operand;
    then one backtrack per token, and the reference again."""
    import re

    from halluc_rl.data.arithmetic import check_line

    problems = ArithmeticTask(seed=1, check=check).problems("train", 24)
    source = PlausibleErrors(kinds=("check",), error_rate=1.0, max_errors=2)
    bt = backtrack_token_id(tokenizer)
    found = 0
    for problem, example in zip(problems, build_examples(problems, tokenizer, source)):
        prompt, response = encode_problem(problem, tokenizer)
        assert example.visible_response() == response
        kinds = [kind for kind, _, _ in example.spans]
        mask = example.labels_mask()
        for i, (kind, start, end) in enumerate(example.spans):
            if kind != "error":
                continue
            found += 1
            assert kinds[i + 1 : i + 3] == ["reveal", "backtrack"]
            _, r_start, r_end = example.spans[i + 1]
            _, b_start, b_end = example.spans[i + 2]
            assert b_end - b_start == r_end - start and set(example.input_ids[b_start:b_end]) == {bt}
            assert not any(mask[start:end]) and all(mask[r_start:b_end])  # the wrong digits masked, the check trained
            before = tokenizer.decode(apply_actions(example.input_ids[len(prompt) : start], bt).visible_ids)
            step = re.search(r"(\d+) ([-+*/]) (\d+) = (\d*)$", before)  # the step whose result goes wrong
            wrong = step.group(4) + tokenizer.decode(example.input_ids[start:end]).strip()
            reveal = tokenizer.decode(example.input_ids[r_start:r_end])
            assert reveal == "\n" + check_line(int(wrong), step.group(2), int(step.group(3)), prefix)
            assert not reveal.endswith(f"= {step.group(1)}")  # the check misses: the error shows
    assert found >= len(problems)
    plain = PlausibleErrors(kinds=("check",), error_rate=1.0).make_example(*encode_problem(PROBLEMS[0], tokenizer),
                                                                           tokenizer)
    assert plain.num_errors == 0  # no check lines, no check errors


def test_divergent_spans():
    assert divergent_spans([1, 2, 9, 9, 4, 5], [1, 2, 3, 4, 5]) == [(2, [9, 9])]
    assert divergent_spans([1, 7, 2, 3], [1, 2, 3]) == [(1, [7])]  # insertion
    assert divergent_spans([1, 3], [1, 2, 3]) == []  # a skipped token alone gives no error tokens
    assert divergent_spans([1, 2, 3], [1, 2, 3]) == []
    assert divergent_spans([8, 2, 3, 9], [1, 2, 3, 4]) == [(0, [8]), (3, [9])]
    assert divergent_spans([1, 2, 3, 4], [1, 2]) == []  # past the reference's end


def test_self_generated_uses_the_model_samples(tokenizer, monkeypatch):
    bt = backtrack_token_id(tokenizer)
    source = SelfGeneratedErrors(make_model("llama", tokenizer), error_rate=1.0, max_errors=2, error_length=(1, 2))
    problems = PROBLEMS[:4]
    pairs = [encode_problem(p, tokenizer) for p in problems]
    refs = [r for _, r in pairs]
    eos = tokenizer.eos_token_id
    q, z, at = (tokenizer.convert_tokens_to_ids(t) for t in ("Q", "Z", "@"))  # never in these solutions
    digit = tokenizer.convert_ids_to_tokens(refs[3][-2])  # the answer's last digit
    other = tokenizer.convert_tokens_to_ids("1" if digit == "0" else "0")
    right_answer = tokenizer(f" #### {problems[2].answer}", add_special_tokens=False)["input_ids"] + [eos]
    canned = [
        refs[0][:3] + [q, z, at, eos],  # diverges at 3; cut to 2 tokens
        list(refs[1]),  # exactly right: clean
        right_answer,  # another path to the right answer: clean
        [q] + refs[3][1:4] + [z] + refs[3][5:-2] + [other, eos],  # three divergent spans, a wrong answer
    ]
    seen = {}

    def fake_sample(prompts, tok, max_new_tokens, seed):
        seen["prompts"], seen["max_new_tokens"] = prompts, max_new_tokens
        return [canned[i] for i in range(len(prompts))]

    monkeypatch.setattr(source, "sample", fake_sample)
    examples = source.make_examples(pairs, tokenizer)
    assert seen["prompts"] == [p for p, _ in pairs] and seen["max_new_tokens"] == max(map(len, refs)) + 16
    assert _errors_with_positions(examples[0]) == [(3, [q, z])]
    assert examples[1].num_errors == 0 and examples[2].num_errors == 0
    spans = [(0, [q]), (4, [z]), (len(refs[3]) - 2, [other])]
    assert source.plan_from_sample(canned[3], refs[3], tokenizer, 3) == spans
    assert source.plan_from_sample(canned[3], refs[3], tokenizer, 2) == spans[:2]
    assert 1 <= examples[3].num_errors <= 2
    assert _errors_with_positions(examples[3]) == spans[: examples[3].num_errors]  # in order, up to the cap
    for (prompt, response), example in zip(pairs, examples):
        _check_structure(example, prompt, response, bt)


def test_self_generated_errors_come_from_generate(tokenizer):
    """With a real model, each error is a span of what generate sampled for that prompt."""
    source = SelfGeneratedErrors(make_model("llama", tokenizer, seed=3), error_rate=1.0, max_errors=1, batch_size=4)
    pairs = [encode_problem(p, tokenizer) for p in PROBLEMS[:4]]
    recorded = []
    original = source.sample

    def recording(*args):
        recorded.extend(original(*args))
        return recorded[-len(args[0]):]

    source.sample = recording
    examples = source.make_examples(pairs, tokenizer)
    for sample, (_, response), example in zip(recorded, pairs, examples):
        for position, tokens in _errors_with_positions(example):
            assert (position, tokens) in [(p, t[: len(tokens)]) for p, t in divergent_spans(sample, response)]
    assert sum(e.num_errors for e in examples) >= 3


def test_errors_reexports_the_example_and_vocabulary_names():
    homes = {"examples": ["SPAN_KINDS", "Span", "ErrorPlan", "BacktrackExample", "assemble_example",
                          "normalize_spans", "spans_labels_mask"],
             "vocabulary": ["OPERATORS", "VocabularyClasses", "special_ids", "vocabulary_classes"]}
    for module, names in homes.items():
        home = importlib.import_module(f"halluc_rl.data.{module}")
        for name in names:
            assert getattr(errors, name) is getattr(home, name), f"errors.{name} is not {module}.{name}"
            assert name in errors.__all__


def test_until_special_cuts_before_the_first_special_token():
    assert until_special([5, 6, 2, 7], {2}) == [5, 6]
    assert until_special([2, 5], {2}) == []
    assert until_special((5, 6), {2}) == [5, 6] and all(type(t) is int for t in until_special([True, 3], set()))
