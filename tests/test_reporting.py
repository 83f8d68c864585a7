"""The one home of tables and plots: table text, cells, the ablation's table, the RL curves and the old names."""

from __future__ import annotations

import json

from halluc_rl import evaluation, reporting
from halluc_rl.reporting import ablation_table, cell, markdown_table, mean_std, moving_mean, plot_rl

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_markdown_table_right_aligns_from_the_numeric_column():
    text = markdown_table(["stage", "a", "b"], [["base", "0.100", "-"]], numeric_from=1)
    assert text == "| stage | a | b |\n|---|---:|---:|\n| base | 0.100 | - |"
    assert markdown_table(["PRM", "auc"], [["mc", "0.5"]]).splitlines()[1] == "|---|---|"  # none right-aligned


def test_cells_round_rates_and_token_counts_and_show_missing_values_as_a_dash():
    assert [cell("accuracy_greedy", 0.12345), cell("tokens_per_solved", 80.46), cell("num_problems", 16)] == [
        "0.123", "80.5", "16"]
    assert cell("auc", None) == cell("auc", float("nan")) == "-"


def test_ablation_table_gives_mean_and_std_per_row_and_names_failed_seeds():
    results = {"a": [{"x": 0.5}, {"x": 0.6}], "b": [{"x": 0.25}, {"error": "boom"}]}
    lines = ablation_table(results, {"a": "default", "b": "one change"}, ["x"]).splitlines()
    assert lines == ["| row | what differs | x |", "|---|---|---:|", "| a | default | 0.550 ± 0.071 |",
                     "| b (1 seed(s) failed) | one change | 0.250 |"]
    assert mean_std([]) == "-"


def test_moving_mean_averages_the_window_ending_at_each_point():
    assert moving_mean([1.0, 3.0, 5.0, 7.0], window=2) == [1.0, 2.0, 4.0, 6.0]
    assert moving_mean((2.0, 4.0)) == [2.0, 3.0]  # fewer than the window at the start


def test_plot_rl_draws_the_arms_that_have_a_log_and_nothing_without_one(tmp_path):
    assert plot_rl(tmp_path, tmp_path / "rl.png") is None and not (tmp_path / "rl.png").exists()
    (tmp_path / "ppo").mkdir()
    rows = [{"update": u, "rollout/accuracy": 0.1 * u, "rollout/backtrack_rate": 0.01,
             "rollout/backtrack_precision": None if u == 1 else 0.5} for u in range(1, 4)]
    (tmp_path / "ppo" / "log_history.json").write_text(json.dumps(rows))
    assert plot_rl(tmp_path, tmp_path / "rl.png") == tmp_path / "rl.png"
    assert (tmp_path / "rl.png").read_bytes()[:8] == PNG_MAGIC


def test_the_report_names_stay_importable_from_evaluation():
    for name in ("format_table", "print_table", "plot_accuracy", "write_report", "load_results", "REPORT_COLUMNS",
                 "SHORT_NAMES", "ACCURACY_KEYS"):
        assert getattr(evaluation, name) is getattr(reporting, name)
    assert evaluation._cell is reporting.cell and evaluation._rows is reporting.stage_rows


def test_the_demo_summary_says_when_a_rerun_is_bit_identical(monkeypatch):
    import importlib.metadata

    import torch

    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    env = reporting.run_environment()
    assert env["threads"] == 3 and env["torch"] == importlib.metadata.version("torch")
    line = reporting.demo_summary({}, env).splitlines()[-1]
    assert "bit-identical on rerun with 3 torch thread(s) on cpu" in line and f"torch {env['torch']}" in line
    assert "bit-identical" not in reporting.demo_summary({})  # without the environment, nothing is claimed
