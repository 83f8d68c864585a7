"""Evaluation: exact backtrack metrics on forced traces, evaluate_policy's plumbing, the report, and `halluc-rl eval`."""

from __future__ import annotations

import importlib
import json

import pytest
import torch

from halluc_rl.backtrack import backtrack_token_id
from halluc_rl.data.arithmetic import ArithmeticTask
from halluc_rl.data.problems import Problem, encode_problem
from halluc_rl.evaluation import (
    REPORT_COLUMNS,
    BacktrackCounts,
    backtrack_counts,
    backtrack_metrics,
    evaluate_policy,
    format_table,
    load_results,
    print_table,
    reference_nll,
    write_report,
)
from halluc_rl.generation import generate
from halluc_rl.tiny import build_tiny_model, train_tokenizer
from tests.conftest import CORPUS, make_model

# `agents/` is installed as halluc_rl.agents (a package-dir mapping ruff's import sorter cannot see)
eval_agent = importlib.import_module("halluc_rl.agents.evaluate")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model(tokenizer):
    return make_model("llama", tokenizer)


def _forced(model, tokenizer, rows: list[list[int]]):
    """Generate with every action forced (no EOS stop), so the trace is exactly ``rows``."""
    forced = torch.tensor(rows)
    return generate(model, tokenizer, ["A box"] * len(rows), max_new_tokens=forced.shape[1], forced_actions=forced,
                    eos_token_id=[], loop_guard=None)


def test_backtrack_metrics_on_forced_traces(model, tokenizer):
    bt = backtrack_token_id(tokenizer)
    ref = [10, 11, 12]
    rows = [
        [10, 13, bt, 11, 12, 14],  # types a wrong token, deletes it (precise); the final 14 is off the reference
        [10, 11, bt, 11, 12, bt],  # deletes correct tokens twice (false backtracks)
        [bt, 10, bt, bt, 10, 11],  # failed, false deletion of 10, failed again
        [13, 10, bt, bt, 10, 11],  # 10 after a wrong 13 is off the reference too: both deletions precise
    ]
    out = _forced(model, tokenizer, rows)
    assert out.sequences == [[10, 11, 12, 14], [10, 11], [10, 11], [10, 11]]
    counts = backtrack_counts(out, [ref] * 4)
    assert counts == BacktrackCounts(num_episodes=4, num_actions=24, num_backtracks=8, num_deletions=6,
                                     num_failed=2, num_precise_deletions=3, num_false_deletions=3,
                                     num_correct_appends=12)
    assert backtrack_metrics(out, [ref] * 4) == {
        "backtrack_rate": 8 / 24, "backtrack_precision": 3 / 6, "false_backtrack_rate": 3 / 12,
        "failed_backtracks": 2 / 4, "num_deletions": 6,
    }
    # per row: the same trace against a reference it matches differently
    first = _forced(model, tokenizer, rows[:1])
    assert backtrack_metrics(first, [[10, 13, 11]])["backtrack_precision"] == 0.0  # 13 was right there
    assert backtrack_metrics(first, [[10, 13, 11]])["false_backtrack_rate"] == 1 / 2  # 1 of 10, 13 deleted


def test_backtrack_metrics_without_backtracks_or_correct_tokens(model, tokenizer):
    out = _forced(model, tokenizer, [[20, 21, 22]])
    metrics = backtrack_metrics(out, [[5, 6]])
    assert metrics == {"backtrack_rate": 0.0, "backtrack_precision": None, "false_backtrack_rate": None,
                       "failed_backtracks": 0.0, "num_deletions": 0}
    with pytest.raises(ValueError, match="references"):
        backtrack_metrics(out, [[5], [6]])


def test_backtrack_counts_pool_over_batches(model, tokenizer):
    bt = backtrack_token_id(tokenizer)
    rows = [[10, 13, bt, 11], [bt, 10, bt, 12]]
    refs = [[10, 11], [10, 12]]
    both = backtrack_counts(_forced(model, tokenizer, rows), refs)
    split = backtrack_counts(_forced(model, tokenizer, rows[:1]), refs[:1]) + backtrack_counts(
        _forced(model, tokenizer, rows[1:]), refs[1:])
    assert both == split
    assert both.metrics()["false_backtrack_rate"] == 1 / 3


def test_backtrack_metrics_reject_a_trace_that_disagrees(model, tokenizer):
    bt = backtrack_token_id(tokenizer)
    out = _forced(model, tokenizer, [[10, 11, bt]])
    out.deleted[0, 2] = 10  # a corrupted trace: the backtrack deleted 11
    with pytest.raises(ValueError, match="disagrees"):
        backtrack_metrics(out, [[10, 11]])


EVAL_KEYS = {
    "accuracy_greedy", "accuracy_sampled", "accuracy_greedy_no_backtrack", "accuracy_sampled_no_backtrack",
    "backtrack_rate", "backtrack_precision", "false_backtrack_rate", "failed_backtracks", "num_deletions",
    "sampled_backtrack_rate", "sampled_backtrack_precision", "sampled_false_backtrack_rate",
    "sampled_failed_backtracks", "sampled_num_deletions", "tokens_per_solved", "mean_actions", "truncated_rate",
    "num_problems", "num_samples", "reference_nll", "semantics", "accuracy_majority", "majority_k", "sampled_mean_actions",
    "majority_actions_per_problem",
}


def test_evaluate_policy_keys_and_ranges(model, tokenizer):
    problems = ArithmeticTask().problems("test", 3)
    res = evaluate_policy(model, tokenizer, problems, num_samples=2, max_new_tokens=10, batch_size=4, progress=False)
    assert set(res) == EVAL_KEYS
    for key in ("accuracy_greedy", "accuracy_sampled", "accuracy_greedy_no_backtrack",
                "accuracy_sampled_no_backtrack", "backtrack_rate", "sampled_backtrack_rate", "truncated_rate"):
        assert 0.0 <= res[key] <= 1.0, key
    for key in ("backtrack_precision", "false_backtrack_rate"):
        assert res[key] is None or 0.0 <= res[key] <= 1.0
    assert 1 <= res["mean_actions"] <= 10
    assert res["num_problems"] == 3 and res["num_samples"] == 2
    # the greedy trace metrics are exactly those of the same greedy decode (loop_guard=1 is evaluate_policy's default)
    refs = [encode_problem(p, tokenizer) for p in problems]
    greedy = generate(model, tokenizer, [p for p, _ in refs], max_new_tokens=10, loop_guard=1)
    expected = backtrack_counts(greedy, [r for _, r in refs]).metrics()
    assert {k: res[k] for k in expected} == expected
    skipped = evaluate_policy(model, tokenizer, problems[:1], num_samples=0, max_new_tokens=4, progress=False)
    assert skipped["accuracy_sampled"] is None and skipped["sampled_backtrack_rate"] is None


def _bias_head(model, bias: dict[int, float]):
    """Add ``bias`` to the output logits (a forward hook on the LM head): a policy whose choices are known."""
    vec = torch.zeros(model.get_output_embeddings().weight.shape[0])
    for token, value in bias.items():
        vec[token] = value
    return model.get_output_embeddings().register_forward_hook(lambda module, args, output: output + vec)


def _sevens_problems(n_right: int, n_wrong: int, digits: int) -> list[Problem]:
    questions = [p.question for p in ArithmeticTask().problems("test", n_right + n_wrong)]
    gold = ["7" * digits] * n_right + ["5"] * n_wrong
    return [Problem(q, f"#### {g}", g) for q, g in zip(questions, gold)]


def test_evaluate_policy_grades_and_masks_backtracking(tokenizer):
    model = make_model("llama", tokenizer, seed=2)
    seven, eight, nine = (tokenizer(d, add_special_tokens=False)["input_ids"][0] for d in ("7", "8", "9"))
    bt = backtrack_token_id(tokenizer)
    problems = _sevens_problems(n_right=2, n_wrong=1, digits=6)
    kw = dict(num_samples=2, max_new_tokens=6, batch_size=2, progress=False)

    handle = _bias_head(model, {seven: 100.0})  # always types "7": answers 777777
    try:
        res = evaluate_policy(model, tokenizer, problems, **kw)
    finally:
        handle.remove()
    for key in ("accuracy_greedy", "accuracy_sampled", "accuracy_greedy_no_backtrack",
                "accuracy_sampled_no_backtrack"):
        assert res[key] == pytest.approx(2 / 3), key
    assert res["tokens_per_solved"] == pytest.approx(18 / 2)
    assert res["backtrack_rate"] == 0.0 and res["truncated_rate"] == 1.0 and res["mean_actions"] == 6

    # deletes every token it types. Greedy (loop_guard=1): 7, delete, 8 (7 is banned at 0 now), delete, 9, delete.
    # Sampled (no guard): 7, delete, three times over. A backtrack on the empty response would be a no-op, so
    # decoding never picks one.
    deleting = {seven: 100.0, eight: 90.0, nine: 80.0, bt: 200.0}
    handle = _bias_head(model, deleting)
    try:
        res = evaluate_policy(model, tokenizer, problems, **kw)
    finally:
        handle.remove()
    assert res["accuracy_greedy"] == 0.0 and res["accuracy_sampled"] == 0.0
    assert res["accuracy_greedy_no_backtrack"] == pytest.approx(2 / 3)
    assert res["accuracy_sampled_no_backtrack"] == pytest.approx(2 / 3)
    for prefix, episodes in (("", 3), ("sampled_", 3 * 2)):
        assert res[f"{prefix}backtrack_rate"] == 0.5
        assert res[f"{prefix}failed_backtracks"] == 0.0 and res[f"{prefix}num_deletions"] == 3 * episodes
        assert res[f"{prefix}backtrack_precision"] == 1.0  # the reference starts with " ####": all off it
        assert res[f"{prefix}false_backtrack_rate"] is None  # no token on the reference was typed
    assert res["tokens_per_solved"] is None and res["mean_actions"] == 6 and res["truncated_rate"] == 1.0

    # the decoding knobs of the runs with backtracking on: a budget of 0 or a large negative bias stops the
    # deletions; a large positive bias makes the "7" policy delete like the one above
    for knobs, head in (({"backtrack_budget": 0}, deleting), ({"backtrack_bias": -1000.0}, deleting),
                        ({"backtrack_bias": 200.0}, {seven: 100.0, eight: 90.0, nine: 80.0})):
        handle = _bias_head(model, head)
        try:
            res = evaluate_policy(model, tokenizer, problems, **kw, **knobs)
        finally:
            handle.remove()
        deletes = knobs.get("backtrack_bias", 0) > 0
        assert res["backtrack_rate"] == res["sampled_backtrack_rate"] == (0.5 if deletes else 0.0), knobs
        assert res["accuracy_greedy"] == res["accuracy_sampled"] == (0.0 if deletes else pytest.approx(2 / 3))
        assert res["accuracy_sampled_no_backtrack"] == pytest.approx(2 / 3)  # the knobs never touch the control


def test_evaluate_policy_counts_on_a_hand_made_trace(tokenizer):
    """A policy whose traces are known by hand, with correct and wrong tokens deleted: exact counts."""
    model = make_model("llama", tokenizer, seed=2)
    space, hashes = tokenizer(" ####", add_special_tokens=False)["input_ids"]
    seven, eight = (tokenizer(d, add_special_tokens=False)["input_ids"][0] for d in ("7", "8"))
    bt = backtrack_token_id(tokenizer)
    problems = _sevens_problems(n_right=1, n_wrong=1, digits=2)
    assert all(encode_problem(p, tokenizer)[1][:2] == [space, hashes] for p in problems)  # " #### 77</s>"...
    handle = _bias_head(model, {bt: 300.0, space: 200.0, seven: 100.0, eight: 90.0})
    try:
        res = evaluate_policy(model, tokenizer, problems, num_samples=2, max_new_tokens=6, batch_size=4,
                              progress=False)
        nll = res.pop("reference_nll")  # teacher-forced under the same biased head; the scorer is tested elsewhere
        assert nll == pytest.approx(reference_nll(model, *zip(*[encode_problem(p, tokenizer) for p in problems])))
    finally:
        handle.remove()
    # greedy (loop_guard=1): " " (on the reference), delete it (false), "7" (" " is banned at 0; off the
    # reference), delete it (precise), "8" (7 banned too), delete it (precise): per episode 3 of 6 actions are
    # backtracks, 1 correct append, 1 false and 2 precise deletions.
    # sampled (no guard): " ", delete, three times over: 3 correct appends, 3 false deletions.
    assert res.pop("semantics") == "rewind"
    assert {k: res.pop(k) for k in ("accuracy_majority", "majority_k", "majority_actions_per_problem")} == {
        "accuracy_majority": None, "majority_k": 0, "majority_actions_per_problem": None}
    assert res == {
        "accuracy_greedy": 0.0, "accuracy_sampled": 0.0, "accuracy_greedy_no_backtrack": 0.0,
        "accuracy_sampled_no_backtrack": 0.0,
        "backtrack_rate": 6 / 12, "backtrack_precision": 4 / 6, "false_backtrack_rate": 2 / 2,
        "failed_backtracks": 0.0, "num_deletions": 6,
        "sampled_backtrack_rate": 12 / 24, "sampled_backtrack_precision": 0 / 12,
        "sampled_false_backtrack_rate": 12 / 12, "sampled_failed_backtracks": 0.0, "sampled_num_deletions": 12,
        "tokens_per_solved": None, "mean_actions": 6.0, "sampled_mean_actions": 6.0,
        "truncated_rate": 1.0, "num_problems": 2, "num_samples": 2,
    }


def test_evaluate_policy_sampling_is_seeded_and_matches_generate(tokenizer):
    model = make_model("llama", tokenizer, seed=3)
    seven, eight = (tokenizer(d, add_special_tokens=False)["input_ids"][0] for d in ("7", "8"))
    bt = backtrack_token_id(tokenizer)
    problems = ArithmeticTask().problems("test", 3)
    kw = dict(num_samples=4, max_new_tokens=12, batch_size=8, progress=False)
    handle = _bias_head(model, {seven: 100.0, eight: 100.0, bt: 100.0})  # a near-uniform choice of 7, 8, backtrack
    try:
        a = evaluate_policy(model, tokenizer, problems, seed=0, **kw)
        b = evaluate_policy(model, tokenizer, problems, seed=0, **kw)
        others = [evaluate_policy(model, tokenizer, problems, seed=seed, **kw) for seed in (1, 2)]
        refs = [encode_problem(p, tokenizer) for p in problems]
        greedy = generate(model, tokenizer, [p for p, _ in refs], max_new_tokens=12, loop_guard=1)
    finally:
        handle.remove()
    assert a == b
    sampled = ("sampled_backtrack_rate", "sampled_num_deletions", "sampled_failed_backtracks")
    assert len({tuple(r[k] for k in sampled) for r in (a, *others)}) > 1  # other seeds, other samples
    assert 0.1 < a["sampled_backtrack_rate"] < 0.6 and a["sampled_num_deletions"] > 5
    assert a["sampled_backtrack_precision"] == 1.0  # nothing typed is on the reference (" ####..."): all precise
    assert a["sampled_false_backtrack_rate"] is None
    expected = backtrack_metrics(greedy, [r for _, r in refs])
    assert {k: a[k] for k in expected} == expected


STAGES = {
    "base": {"accuracy_greedy": 0.25, "accuracy_sampled": 0.125, "accuracy_greedy_no_backtrack": 0.25,
             "accuracy_sampled_no_backtrack": 0.125, "backtrack_rate": 0.0, "backtrack_precision": None,
             "false_backtrack_rate": None, "tokens_per_solved": 250.0, "num_problems": 200},
    "plain_sft": {"accuracy_greedy": 0.5, "accuracy_sampled": 0.375, "accuracy_greedy_no_backtrack": 0.5,
                  "accuracy_sampled_no_backtrack": 0.375, "backtrack_rate": 0.001, "backtrack_precision": 0.5,
                  "false_backtrack_rate": 0.002, "tokens_per_solved": 123.456, "num_problems": 200},
    "backtrack_sft": {"accuracy_greedy": 0.625, "accuracy_sampled_no_backtrack": float("nan"),
                      "backtrack_rate": 0.05, "backtrack_precision": 0.9, "num_problems": 200},
}


def test_write_report(tmp_path, capsys):
    paths = write_report(STAGES, tmp_path / "report", title="test report")
    assert set(paths) == {"json", "markdown", "plot"} and all(p.exists() for p in paths.values())
    assert paths["plot"].read_bytes()[:8] == PNG_MAGIC and paths["plot"].stat().st_size > 1000

    md = paths["markdown"].read_text()
    assert md.startswith("# test report\n")
    lines = [line for line in md.splitlines() if line.startswith("|")]
    assert lines[0] == "| " + " | ".join(["stage", *REPORT_COLUMNS]) + " |"
    assert len(lines) == 2 + 3
    assert lines[2].startswith("| base | 0.250 | 0.125 | 0.250 | 0.125 | 0.000 | - | - | 250.0 | 200 |")
    assert "| plain_sft | 0.500 |" in lines[3] and "| 123.5 |" in lines[3]
    assert lines[4].startswith("| backtrack_sft | 0.625 | - | - | - | 0.050 | 0.900 | - | - | 200 |")

    data = json.loads(paths["json"].read_text())
    assert data["title"] == "test report"
    loaded = load_results(paths["json"].parent)
    assert list(loaded) == ["base", "plain_sft", "backtrack_sft"]
    assert loaded["plain_sft"] == STAGES["plain_sft"]
    assert loaded["backtrack_sft"]["accuracy_sampled_no_backtrack"] is None  # NaN kept as strict JSON

    more = {**loaded, "dpo": {"accuracy_greedy": 0.7}}  # a later stage just adds a row
    write_report(more, tmp_path / "report")
    assert list(load_results(tmp_path / "report")) == ["base", "plain_sft", "backtrack_sft", "dpo"]
    assert format_table(more).count("\n") == 2 + 4
    with pytest.raises(ValueError):
        write_report({}, tmp_path / "empty")
    print_table(more, title="printed")
    printed = capsys.readouterr().out
    assert "printed" in printed and "acc greedy no-BT" in printed and "backtrack_sft" in printed
    assert "| dpo | 0.700 | - |" in format_table(more)


def _save_policy(model, tokenizer, path):
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def test_eval_cli_end_to_end(tmp_path, tokenizer, capsys):
    policy = _save_policy(make_model("llama", tokenizer), tokenizer, tmp_path / "sft_run")
    out = tmp_path / "eval"
    common = ["--num_samples", "1", "--max_new_tokens", "8", "--batch_size", "8", "--output_dir", str(out)]
    assert eval_agent.main(["--policy", str(policy), "--num_problems", "4", *common]) == 0
    config = tmp_path / "eval.yaml"
    config.write_text(f"policy: {policy}\nnum_problems: 2\nname: second\nstop_strings: ['####']\n")
    assert eval_agent.main(["--config", str(config), "--num_problems", "3", *common]) == 0

    results = load_results(out)
    assert list(results) == ["sft_run", "second"]  # the default name is the policy directory's
    assert results["sft_run"]["num_problems"] == 4 and results["second"]["num_problems"] == 3  # CLI beats YAML
    assert set(results["sft_run"]) == EVAL_KEYS | {"semantics_override"}
    assert results["sft_run"]["semantics"] == "rewind" and results["sft_run"]["semantics_override"] is False
    md = (out / "results.md").read_text()
    assert "| sft_run |" in md and "| second |" in md
    assert (out / "results.png").read_bytes()[:8] == PNG_MAGIC
    assert (out / "eval_config_second.yaml").exists()
    assert "sft_run" in capsys.readouterr().out

    assert eval_agent.main(["--policy", str(policy), "--num_problems", "1", "--append", "false", *common]) == 0
    assert list(load_results(out)) == ["sft_run"]


def test_eval_cli_adapter_policy(tmp_path, tokenizer):
    """A PEFT adapter directory (with its tokenizer) is evaluated on its base model."""
    from halluc_rl.adapters import base_model_name, make_lora_model
    from halluc_rl.args import LoraArgs
    from halluc_rl.modeling import load_model

    base = _save_policy(make_model("llama", tokenizer), tokenizer, tmp_path / "base")
    lora = make_lora_model(load_model(str(base)), LoraArgs(lora_r=4), backtrack_token_id(tokenizer))
    adapter = _save_policy(lora, tokenizer, tmp_path / "adapter")
    assert base_model_name(adapter) == str(base)
    rc = eval_agent.main(["--policy", str(adapter), "--num_problems", "2", "--num_samples", "1",
                          "--max_new_tokens", "6", "--output_dir", str(tmp_path / "eval")])
    assert rc == 0
    assert load_results(tmp_path / "eval")["adapter"]["num_problems"] == 2


def test_eval_cli_base_model_without_backtrack_token(tmp_path):
    plain = train_tokenizer(CORPUS * 4, vocab_size=320, special_tokens=("<pad>", "<s>", "</s>", "<unk>"))
    model = build_tiny_model("llama", vocab_size=len(plain), hidden_size=64, num_layers=2)
    policy = _save_policy(model, plain, tmp_path / "base")
    rc = eval_agent.main(["--policy", str(policy), "--num_problems", "2", "--num_samples", "0",
                          "--max_new_tokens", "4", "--output_dir", str(tmp_path / "eval")])
    assert rc == 0
    assert load_results(tmp_path / "eval")["base"]["num_problems"] == 2


def test_eval_cli_errors(tmp_path, capsys):
    missing = tmp_path / "no_such_policy"
    assert eval_agent.main(["--policy", str(missing), "--output_dir", str(tmp_path / "eval")]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "--policy tiny" in err
    assert eval_agent.main(["--policy", "tiny", "--task", "mnist"]) == 2
    assert "mnist" in capsys.readouterr().err
    assert eval_agent.main(["--policy", "tiny", "--num_problems", "0"]) == 2
    assert "endless" in capsys.readouterr().err
    assert not (tmp_path / "eval").exists()


def test_eval_cli_gsm8k(tmp_path, tokenizer, gsm8k_dir):
    policy = _save_policy(make_model("llama", tokenizer), tokenizer, tmp_path / "policy")
    rc = eval_agent.main(["--policy", str(policy), "--task", "gsm8k", "--data_files", str(gsm8k_dir),
                          "--num_problems", "2", "--num_samples", "0", "--max_new_tokens", "4",
                          "--output_dir", str(tmp_path / "eval"), "--name", "gsm8k_row"])
    assert rc == 0
    row = load_results(tmp_path / "eval")["gsm8k_row"]
    assert row["num_problems"] == 2 and row["mean_actions"] <= 4


def test_majority_at_k_grades_the_vote_of_k_samples(model, tokenizer):
    """maj@k samples k answers per problem on its own stream and grades their vote; the actions it reports are
    the ones those samples spent."""
    from halluc_rl.data.grading import majority_reward
    from halluc_rl.evaluation import majority_vote
    from halluc_rl.generation import generate

    problems = ArithmeticTask().problems("test", 3)
    prompts = [encode_problem(p, tokenizer)[0] for p in problems]
    golds = [p.answer for p in problems]
    res = majority_vote(model, tokenizer, prompts, golds, 4, temperature=1.0, seed=0, batch_size=5,
                        max_new_tokens=10)
    g = torch.Generator().manual_seed(1)
    texts, actions = [], 0
    rows = [i for i in range(3) for _ in range(4)]
    for start in range(0, 12, 5):
        out = generate(model, tokenizer, [prompts[i] for i in rows[start:start + 5]], do_sample=True, generator=g,
                       max_new_tokens=10)
        texts += out.texts
        actions += int(out.action_mask.sum())
    expected = sum(majority_reward(texts[4 * i: 4 * i + 4], golds[i]) for i in range(3)) / 3
    assert res == {"accuracy_majority": expected, "majority_k": 4, "majority_actions_per_problem": actions / 3}
    assert actions > 0
