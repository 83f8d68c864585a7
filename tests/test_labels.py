"""Step labels: steps, oracle labels on hand-made answers, Monte-Carlo labels on a policy whose values are known,
the label cache (reused, refused for another policy or task), and the PRM yardstick (AUC, first-error F1)."""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import pytest
import torch

import halluc_rl.labels as labels_mod
from halluc_rl.config import UsageError
from halluc_rl.data.arithmetic import ArithmeticTask
from halluc_rl.data.problems import Problem, encode_problem, format_solution
from halluc_rl.labels import (
    LabelSettings,
    make_step_labels,
    newline_token_ids,
    oracle_step_labels,
    step_ends,
    step_labels,
)
from halluc_rl.prm_metrics import evaluate_step_scores, first_error_f1, roc_auc
from halluc_rl.tiny import train_tokenizer
from tests.conftest import CORPUS, make_model
from tests.test_values import Scripted

pytestmark = pytest.mark.usefixtures("one_thread")

NL, EOS = 203, 2


def test_step_ends():
    assert step_ends([5, NL, 6, NL, 7, EOS], {NL}, {EOS}) == [1, 3, 5]
    assert step_ends([5, NL, 6, 7], {NL}, {EOS}) == [1, 3]  # unfinished: the last token closes the last step
    assert step_ends([5, NL, EOS], {NL}, {EOS}) == [2]  # "...\n</s>" is one step, not an empty one
    assert step_ends([5, NL], {NL}, {EOS}) == [1]
    assert step_ends([NL, NL, EOS], {NL}, {EOS}) == [0, 2]
    assert step_ends([], {NL}, {EOS}) == []


def test_newline_tokens(tokenizer):
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert newline_token_ids(tokenizer) == newline and newline_token_ids(tokenizer) == [NL]


def _answer(tokenizer, text: str, ended: bool = True) -> list[int]:
    ids = tokenizer(format_solution(text, tokenizer), add_special_tokens=False)["input_ids"]
    return ids + [tokenizer.eos_token_id] * ended


def test_oracle_labels_on_hand_made_answers(tokenizer):
    problem = Problem("Tom has 18. He gives 13 away, then gets 4.", "18 - 13 = 5\n5 + 4 = 9\n#### 9", "9")
    cases = {
        "18 - 13 = 5\n5 + 4 = 9\n#### 9": [1, 1, 1],  # the reference
        "18 - 13 = 5\n5 + 4 = 8\n#### 8": [1, 0, 0],  # the second line is wrong, and so is all after it
        "18 - 13 = 6\n6 + 4 = 10\n#### 10": [0, 0, 0],
        "18 - 13 = 5\n5 + 4 = 9\n#### 9\n": [1, 1, 1],  # a trailing newline before EOS: the same last step
        "18 - 13 = 5\n": [0],  # ended after a right line: its step ends the answer wrongly
    }
    for text, expected in cases.items():
        ids = _answer(tokenizer, text)
        ends = step_ends(ids, {NL}, {tokenizer.eos_token_id})
        assert oracle_step_labels(tokenizer, problem, ids, ends) == expected, text
    # unfinished answers are judged as prefixes
    ids = _answer(tokenizer, "18 - 13 = 5\n5 + 4", ended=False)
    assert oracle_step_labels(tokenizer, problem, ids, step_ends(ids, {NL}, {EOS})) == [1, 1]
    ids = _answer(tokenizer, "18 - 13 = 5\n5 + 7", ended=False)
    assert oracle_step_labels(tokenizer, problem, ids, step_ends(ids, {NL}, {EOS})) == [1, 0]


class ScriptedLines(Scripted):
    """Scripted answers of two lines, with values known: the first line is a bare newline, ``"\\n"`` (probability
    p) or ``"\\n\\n"``; after ``"\\n"`` the answer "7" follows with probability a (else "8"); after ``"\\n\\n"`` a
    backtrack with probability q deletes it (back to the empty answer), else "7" with probability b (else "8");
    EOS after a digit. So V("\\n") = a and V("\\n\\n") = q V("") + (1 - q) b, with
    V("") = (p a + (1 - p)(1 - q) b) / (1 - (1 - p) q)."""

    def __init__(self, model, tokenizer, p: float, q: float, a: float, b: float):
        super().__init__(model, tokenizer, p, q)
        self.nl1, self.nl2 = NL, tokenizer.convert_tokens_to_ids("\n\n")
        self.a, self.b = a, b

    def hook(self, module, args, kwargs, output):
        logits = output.logits  # [B, keep, V]
        last = kwargs["input_ids"][:, -logits.shape[1]:]  # [B, keep]
        new = torch.full_like(logits, float("-inf"))
        log = math.log
        digit = (last == self.seven) | (last == self.eight)
        empty = ~digit & (last != self.nl1) & (last != self.nl2)
        after1, after2 = last == self.nl1, last == self.nl2

        def put(token: int, where: torch.Tensor, logp: float) -> None:
            new[..., token] = torch.where(where, torch.tensor(logp), new[..., token])

        put(self.nl1, empty, log(self.p))
        put(self.nl2, empty, log(1 - self.p))
        put(self.seven, after1, log(self.a))
        put(self.eight, after1, log(1 - self.a))
        put(self.bt, after2, log(self.q))
        put(self.seven, after2, log((1 - self.q) * self.b))
        put(self.eight, after2, log((1 - self.q) * (1 - self.b)))
        put(self.eos, digit, 0.0)
        output.logits = new
        return output


@pytest.fixture(scope="module")
def lines_tokenizer():
    tok = train_tokenizer(CORPUS * 4, vocab_size=320)
    tok.add_tokens(["\n\n"])
    return tok


def test_mc_labels_on_a_policy_whose_values_are_known(lines_tokenizer):
    tok = lines_tokenizer
    model = make_model("llama", tok)
    p, q, a, b = 0.5, 0.4, 0.8, 0.25
    script = ScriptedLines(model, tok, p, q, a, b)
    assert newline_token_ids(tok) == sorted([NL, script.nl2])
    problem = Problem("What is 3 + 4?", "3 + 4 = 7\n#### 7", "7")
    k = 32
    ds = make_step_labels(model, tok, [problem], LabelSettings(samples_per_problem=16, k=k, oracle=False,
                                                               max_new_tokens=12, mc_max_new_tokens=24,
                                                               batch_size=4096),
                          announce=lambda _: None)
    script.handle.remove()
    v0 = (p * a + (1 - p) * (1 - q) * b) / (1 - (1 - p) * q)
    value = {script.nl1: a, script.nl2: q * v0 + (1 - q) * b}
    seen = set()
    for ids, ends, soft, hard, correct in zip(ds["response_ids"], ds["step_ends"], ds["mc_soft"], ds["mc_hard"],
                                              ds["correct"]):
        assert len(ids) == 3 and ends == [0, 2] and ids[2] == tok.eos_token_id
        assert soft[1] == correct == float(ids[1] == script.seven)  # the finished answer: its outcome, exactly
        assert hard == [int(v > 0) for v in soft]
        seen.add(ids[0])
    assert seen == {script.nl1, script.nl2}
    for first, expected in value.items():
        shares = [soft[0] for ids, soft in zip(ds["response_ids"], ds["mc_soft"]) if ids[0] == first]
        draws = len(shares) * k
        stderr = math.sqrt(expected * (1 - expected) / draws)
        assert abs(sum(shares) / len(shares) - expected) <= 4 * stderr, (first, shares, expected)


def _settings(**kw) -> LabelSettings:
    base = dict(samples_per_problem=2, k=2, max_new_tokens=10, mc_max_new_tokens=10)
    return LabelSettings(**{**base, **kw})


def test_the_cache_is_reused_and_refused_for_another_policy_or_task(tokenizer, tmp_path, monkeypatch):
    model = make_model("llama", tokenizer)
    problems = ArithmeticTask(seed=0).problems("train", 3)
    task = {"task": "arithmetic", "split": "train", "task_seed": 0}
    cache = tmp_path / "labels"
    quiet = {"announce": lambda _: None}
    first = step_labels(model, tokenizer, problems, _settings(), task=task, cache=cache, **quiet)
    assert len(first) == 6 and {"oracle", "mc_soft", "mc_hard", "step_ends"} <= set(first.column_names)
    assert [p.name for p in tmp_path.iterdir()] == ["labels"]  # nothing left beside it

    def fail(*args, **kwargs):
        raise AssertionError("labels were made again")

    monkeypatch.setattr(labels_mod, "make_step_labels", fail)
    again = step_labels(model, tokenizer, problems, _settings(), task=task, cache=cache, **quiet)
    assert again.to_dict() == first.to_dict()

    other = make_model("llama", tokenizer, seed=1)
    with pytest.raises(UsageError, match=r"policy\.weights") as err:
        step_labels(other, tokenizer, problems, _settings(), task=task, cache=cache, **quiet)
    assert "\n" not in str(err.value) and str(cache) in str(err.value)
    with pytest.raises(UsageError, match=r"task\.split: 'train' vs 'test'"):
        step_labels(model, tokenizer, problems, _settings(), task={**task, "split": "test"}, cache=cache, **quiet)
    with pytest.raises(UsageError, match=r"task\.problems"):
        step_labels(model, tokenizer, ArithmeticTask(seed=1).problems("train", 3), _settings(), task=task,
                    cache=cache, **quiet)
    with pytest.raises(UsageError, match=r"settings\.k: 2 vs 4"):
        step_labels(model, tokenizer, problems, _settings(k=4), task=task, cache=cache, **quiet)


def test_the_cache_tells_adapters_apart_and_knows_one_reloaded(tokenizer, tmp_path):
    """A cache made by a freshly trained adapter is reused by the same adapter loaded from disk (in another
    process, say), and refused once its weights change."""
    from halluc_rl.adapters import make_lora_model
    from halluc_rl.args import LoraArgs
    from halluc_rl.modeling import load_model, load_policy
    from halluc_rl.policy import write_policy_config

    base = tmp_path / "base"
    make_model("llama", tokenizer).save_pretrained(base)
    tokenizer.save_pretrained(base)
    problems = ArithmeticTask(seed=0).problems("train", 1)
    policy = make_lora_model(load_model(str(base)), LoraArgs(lora_r=2, lora_target_modules=["q_proj"]), 4)
    with torch.no_grad():
        next(p for n, p in policy.named_parameters() if "lora_B" in n).add_(0.1)
    quiet = {"announce": lambda _: None}
    made = step_labels(policy, tokenizer, problems, _settings(k=0), cache=tmp_path / "c", **quiet)
    policy.save_pretrained(tmp_path / "adapter")
    tokenizer.save_pretrained(tmp_path / "adapter")
    write_policy_config(policy, tmp_path / "adapter")
    reloaded, _, _ = load_policy(tmp_path / "adapter")
    assert labels_mod.policy_fingerprint(reloaded) == labels_mod.policy_fingerprint(policy)
    again = step_labels(reloaded, tokenizer, problems, _settings(k=0), cache=tmp_path / "c", **quiet)
    assert again.to_dict() == made.to_dict()
    with torch.no_grad():
        next(p for n, p in policy.named_parameters() if "lora_B" in n).add_(0.1)
    with pytest.raises(UsageError, match=r"policy\.adapter"):
        step_labels(policy, tokenizer, problems, _settings(k=0), cache=tmp_path / "c", **quiet)


def test_a_failed_run_leaves_no_cache(tokenizer, tmp_path, monkeypatch):
    model = make_model("llama", tokenizer)
    problems = ArithmeticTask(seed=0).problems("train", 1)

    def broken(self, path, *args, **kwargs):  # writes half a dataset, then fails
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "data-00000-of-00001.arrow").write_bytes(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr("datasets.Dataset.save_to_disk", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        step_labels(model, tokenizer, problems, _settings(k=0), cache=tmp_path / "c", announce=lambda _: None)
    assert list(tmp_path.iterdir()) == []


def test_a_cache_another_run_saved_meanwhile_is_kept(tokenizer, tmp_path, monkeypatch):
    import shutil

    model = make_model("llama", tokenizer)
    problems = ArithmeticTask(seed=0).problems("train", 1)
    quiet = {"announce": lambda _: None}
    theirs = step_labels(model, tokenizer, problems, _settings(k=0), cache=tmp_path / "a", **quiet)
    made = labels_mod.make_step_labels

    def racing(*args, **kwargs):  # another run finishes first, while this one is labelling
        shutil.copytree(tmp_path / "a", tmp_path / "b")
        return made(*args, **kwargs).select([0])

    monkeypatch.setattr(labels_mod, "make_step_labels", racing)
    kept = step_labels(model, tokenizer, problems, _settings(k=0), cache=tmp_path / "b", **quiet)
    assert kept.to_dict() == theirs.to_dict() and sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_roc_auc_exact():
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    # ties count half: pairs (0.5, 0.5) 1/2, (0.5, 0.2) 1, (0.9, 0.5) 1, (0.9, 0.2) 1
    assert roc_auc([0.5, 0.5, 0.2, 0.9], [1, 0, 0, 1]) == 0.875
    assert roc_auc([0.3, 0.3, 0.3], [1, 0, 1]) == 0.5
    assert roc_auc([0.1, 0.2], [1, 1]) is None


def test_first_error_f1_exact():
    labels = [[1, 1, 0, 0], [1, 0, 0], [1, 1], [1, 1, 1], [1]]
    scores = [[0.9, 0.8, 0.3, 0.1],  # first error at 2: found
              [0.4, 0.2, 0.1],  # first error at 1, predicted at 0: missed
              [0.9, 0.7],  # no error, none predicted
              [0.9, 0.3, 0.8],  # no error, one predicted
              [0.6]]  # no error, none predicted
    out = first_error_f1(scores, labels, 0.5)
    assert out["acc_error"] == 0.5 and out["acc_correct"] == pytest.approx(2 / 3)
    assert out["f1"] == pytest.approx(4 / 7)
    perfect = evaluate_step_scores([[float(v) for v in row] for row in labels], labels, 0.5)
    assert perfect["auc"] == 1.0 and perfect["f1"] == 1.0 and perfect["steps"] == 13 and perfect["samples"] == 5


def test_labels_of_a_real_policy_line_up(tokenizer):
    """Every answer's steps close on newlines or its end, and the oracle marks the reference's own lines right."""
    model = make_model("llama", tokenizer)
    problems = ArithmeticTask(seed=0).problems("test", 2)
    ds = make_step_labels(model, tokenizer, problems, _settings(k=1), announce=lambda _: None)
    for row in ds:
        assert len(row["step_ends"]) == len(row["oracle"]) == len(row["mc_soft"])
        assert row["prompt_ids"] == encode_problem(problems[row["problem_index"]], tokenizer)[0]
        assert all(row["response_ids"][e] == NL for e in row["step_ends"][:-1])


def test_labels_reexports_the_cache_and_metric_names():
    homes = {"label_cache": ["CACHE_VERSION", "RECORD_FILE", "policy_fingerprint", "tokenizer_fingerprint",
                             "problems_fingerprint", "record_differences", "load_label_cache", "save_label_cache"],
             "prm_metrics": ["roc_auc", "first_error", "first_error_f1", "evaluate_step_scores", "prm_step_scores",
                             "implicit_step_scores"]}
    for module, names in homes.items():
        home = importlib.import_module(f"halluc_rl.{module}")
        for name in names:
            assert getattr(labels_mod, name) is getattr(home, name), f"labels.{name} is not {module}.{name}"
            assert name in labels_mod.__all__
