"""End to end: the demo and multi-process SFT. Short versions by default; HALLUC_RL_FULL=1 runs them in full."""

import importlib
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from tests.conftest import FULL

demo = importlib.import_module("halluc_rl.agents.demo")


@pytest.mark.slow
def test_demo_runs_end_to_end_and_writes_its_report(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "demo"
    argv = ["--output_dir", str(out)]
    if not FULL:  # CI: the same pipeline on a handful of problems
        argv += ["--num_train_problems", "64", "--num_eval_problems", "8", "--num_samples", "1",
                 "--sft_epochs", "1", "--dpo_steps", "2", "--ppo_updates", "2", "--dpo_problems", "16"]
    assert demo.main(argv) == 0
    report = json.loads((out / "results.json").read_text())["results"]
    assert list(report) == ["base", "plain_sft", "backtrack_sft", "dpo", "ppo", "control_ppo"]
    for stage in report.values():
        for key in ("accuracy_greedy", "accuracy_sampled", "backtrack_rate", "backtrack_precision",
                    "false_backtrack_rate"):
            assert key in stage
        for key, value in stage.items():  # accuracies and rates are shares
            if (key.startswith("accuracy") or key.endswith(("_rate", "precision"))) and value is not None:
                assert 0.0 <= value <= 1.0, (key, value)
    summary = json.loads((out / "results.json").read_text())["summary"]
    assert summary["task"] == "arithmetic" and summary["semantics"] == "rewind"
    assert (summary["backtrack_stage"], summary["control_stage"]) == ("ppo", "control_ppo")
    ppo_row, control = report["ppo"], report["control_ppo"]
    assert summary["greedy_gain"] == ppo_row["accuracy_greedy"] - control["accuracy_greedy_no_backtrack"]
    assert summary["sampled_gain"] == ppo_row["accuracy_sampled"] - control["accuracy_sampled_no_backtrack"]
    majority = json.loads((out / "control_ppo" / "majority.json").read_text())["metrics"]
    assert summary["majority_k"] == majority["majority_k"] >= 1
    assert summary["majority_gain"] == ppo_row["accuracy_sampled"] - majority["accuracy_majority"]
    assert majority["majority_k"] * control["sampled_mean_actions"] >= ppo_row["sampled_mean_actions"]  # equal tokens
    assert summary["backtrack_precision"] == ppo_row["sampled_backtrack_precision"]
    assert (out / "results.md").read_text().count("|") > 20
    for plot in ("results.png", "rl.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for stage in ("backtrack_sft", "dpo", "ppo", "control_ppo"):
        assert (out / stage / "adapter_model.safetensors").exists()
    for value in (v for stage in report.values() for v in stage.values() if isinstance(v, float)):
        assert math.isfinite(value)
    assert "What backtracking bought" in (out / "summary.txt").read_text()
    env = json.loads((out / "environment.json").read_text())
    assert f"bit-identical on rerun with {env['threads']} torch thread(s)" in (out / "summary.txt").read_text()


@pytest.mark.slow
def test_the_deps_demo_runs_from_tiny_deps_and_is_judged_beyond_its_training_length(tmp_path, monkeypatch):
    """``halluc-rl demo --task deps --semantics retry``: every stage starts from tiny-deps, trains on deps, is
    evaluated on deps:steps=4, and the summary names the task and the semantics (short version in CI)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "demo"
    argv = ["--task", "deps", "--semantics", "retry", "--output_dir", str(out), "--num_train_problems", "64",
            "--num_eval_problems", "8", "--num_samples", "1", "--sft_epochs", "1", "--dpo_steps", "2",
            "--ppo_updates", "2", "--dpo_problems", "16"]
    assert demo.main(argv) == 0
    saved = json.loads((out / "results.json").read_text())
    assert list(saved["results"]) == ["base", "plain_sft", "backtrack_sft", "dpo", "ppo", "control_ppo"]
    assert (saved["summary"]["task"], saved["summary"]["semantics"]) == ("deps", "retry")
    for stage in saved["results"]:
        settings = json.loads((out / stage / "eval.json").read_text())["settings"]
        assert (settings["task"], settings["problems"]) == ("deps:steps=4", 8)
    sft_config = yaml.safe_load((out / "backtrack_sft" / "config.yaml").read_text())
    assert (sft_config["model_name_or_path"], sft_config["task"], sft_config["error_kinds"]) == (
        "tiny-deps", "deps", ["premature"])
    for stage in ("backtrack_sft", "dpo", "ppo"):  # the semantics lives on the policy's config
        assert json.loads((out / stage / "config.json").read_text())["backtrack_semantics"] == "retry"
    assert "tiny-deps on held-out deps:steps=4" in (out / "results.md").read_text()


def test_demo_stages_runs_some_stages_and_a_later_run_reuses_them(tmp_path, monkeypatch):
    """``--stages base plain_sft`` trains and reports those two (no summary: it compares ppo with control_ppo); a
    rerun asking for more finds them done and does not train them again, and its report keeps every finished
    stage, the ones it was not asked for too."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "demo"
    small = ["--task", "deps", "--output_dir", str(out), "--num_train_problems", "32", "--num_eval_problems", "4",
             "--num_samples", "1", "--sft_epochs", "1"]
    assert demo.main([*small, "--stages", "base", "plain_sft"]) == 0
    saved = json.loads((out / "results.json").read_text())
    assert list(saved["results"]) == ["base", "plain_sft"] and "summary" not in saved
    assert not (out / "rl.png").exists() and not (out / "backtrack_sft").exists()
    weights = (out / "plain_sft" / "adapter_model.safetensors").stat().st_mtime_ns
    assert demo.main([*small, "--stages", "plain_sft", "backtrack_sft"]) == 0
    assert (out / "plain_sft" / "adapter_model.safetensors").stat().st_mtime_ns == weights  # reused, not retrained
    again = json.loads((out / "results.json").read_text())["results"]
    assert list(again) == ["base", "plain_sft", "backtrack_sft"] and again["base"] == saved["results"]["base"]
    assert list(json.loads((out / "timings.json").read_text())) == ["base", "plain_sft", "backtrack_sft"]


def test_the_base_stage_of_a_real_model_is_evaluated_with_an_untrained_backtrack_token(tmp_path, monkeypatch):
    """A base model without ``<|BACKTRACK|>`` (SmolLM2: the demo's stage base) is evaluated as ``halluc-rl eval``
    does, with an untrained token added, instead of failing."""
    stages = importlib.import_module("halluc_rl.agents.stages")
    from halluc_rl.modeling import load_policy

    seen = []

    def loading(policy, **kw):
        seen.append(kw)
        return load_policy("tiny-deps", **kw)

    monkeypatch.setattr(stages, "load_policy", loading)
    metrics = stages.cached_metrics(tmp_path / "eval.json", {"task": "deps", "problems": 2, "seed": 0},
                                    "smollm2-135m", lambda model, tok, problems: {"n": len(problems)})
    assert metrics == {"n": 2} and seen == [{"add_missing_backtrack": True}]


def _sft(tmp_path, name, processes):
    """Loss curve of a short SFT run. Global batches of 8; with several processes each batch is split between them
    (``split_batches``), so every step sees the same examples as the single-process run."""
    out = tmp_path / name
    args = ["--config", "configs/sft_tiny.yaml", "--output_dir", str(out), "--report_to", "none",
            "--num_train_problems", "64" if not FULL else "320", "--max_steps", "4" if not FULL else "20",
            "--per_device_train_batch_size", "8", "--accelerator_config", '{"split_batches": true}',
            "--logging_steps", "1", "--save_strategy", "no", "--disable_tqdm", "true",
            "--dataloader_drop_last", "true", "--resume", "false"]
    if processes == 1:
        cmd = [sys.executable, "-m", "halluc_rl.agents.sft", *args]
    else:
        cmd = [shutil.which("accelerate"), "launch", "--cpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "halluc_rl.agents.sft", *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=os.path.dirname(os.path.dirname(__file__)), env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [h["loss"] for h in json.loads((out / "log_history.json").read_text()) if "loss" in h]


@pytest.mark.slow
def test_two_processes_through_accelerate_match_one(tmp_path):
    """accelerate launch --num_processes 2 on CPU (gloo): the same global batch gives the same loss curve."""
    if shutil.which("accelerate") is None:
        pytest.skip("accelerate's launcher is not on PATH")
    one = _sft(tmp_path, "one", 1)
    two = _sft(tmp_path, "two", 2)
    assert len(one) == len(two) > 0
    assert two == pytest.approx(one, rel=1e-3, abs=1e-3)  # the same curve, up to float reduction order


@pytest.mark.slow
def test_the_full_demo_keeps_the_documented_direction(tmp_path):
    """HALLUC_RL_FULL=1: the whole demo (about 6 minutes on 2 cores) against docs/efficacy.md. Documented: SFT
    lifts the base by more than 10 points greedy, and backtracking does not beat the no-backtrack control."""
    if not FULL:
        pytest.skip("HALLUC_RL_FULL=1 runs the whole demo")
    out = tmp_path / "demo"
    assert demo.main(["--output_dir", str(out)]) == 0
    r = json.loads((out / "results.json").read_text())["results"]
    assert r["plain_sft"]["accuracy_greedy"] > r["base"]["accuracy_greedy"] + 0.10
    assert r["ppo"]["accuracy_sampled"] < r["control_ppo"]["accuracy_sampled_no_backtrack"] + 0.03
    assert r["ppo"]["accuracy_greedy"] < r["plain_sft"]["accuracy_greedy"] + 0.03


def test_ablation_summary_gives_mean_and_std_per_row_and_names_failed_seeds(tmp_path):
    from halluc_rl.agents.ablation import FIGURES, rows, write_summary

    args = demo.DemoArgs(output_dir=str(tmp_path))
    names = list(rows(args, tmp_path))
    by_seed = {seed: {name: dict.fromkeys(FIGURES, 0.5 + 0.1 * seed) for name in names} for seed in (0, 1)}
    by_seed[1][names[3]] = {"error": "ValueError: too few pairs"}  # one seed of one row failed
    text = write_summary(args, by_seed, minutes=12.0)
    lines = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| ")}
    assert lines[f"| {names[0]}"].count("0.550 ± 0.071") == len(FIGURES)  # mean and stdev of 0.5 and 0.6
    assert lines[f"| {names[3]} (1 seed(s) failed)"].count("| 0.500") == len(FIGURES)  # the seed that ran
    saved = json.loads((tmp_path / "ablation.json").read_text())
    assert saved["seeds"] == [0, 1] and saved["results"][names[3]][1] == {"error": "ValueError: too few pairs"}
    assert (tmp_path / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ablation_tasks_start_after_the_rows_they_build_on_longest_chain_first():
    from halluc_rl.agents.ablation import MINUTES, NEEDS, ready, rows

    for task in NEEDS:  # NEEDS and MINUTES name every row of the task's table, and only those
        names = set(rows(demo.DemoArgs(task=task), demo.Path("unused")))
        assert set(NEEDS[task]) | {n for needs in NEEDS[task].values() for n in needs} <= names
        assert set(MINUTES[task]) == names
    names = list(rows(demo.DemoArgs(), demo.Path("unused")))
    pending = [(seed, name) for seed in (0, 1) for name in names]
    runnable, blocked = ready(pending, {0: {}, 1: {}})
    assert blocked == [] and {name for _, name in runnable} == set(names) - set(NEEDS["arithmetic"])
    assert runnable[:2] == [(0, "backtrack SFT, factorized head"), (1, "backtrack SFT, factorized head")]
    done = {0: {"backtrack SFT, factorized head": {}, "+ DPO, single-action pairs": {}},
            1: {"backtrack SFT, factorized head": {"error": "RuntimeError: boom"}}}
    runnable, blocked = ready([t for t in pending if t[1] not in done[t[0]]], done)
    assert runnable[0] == (0, "+ PPO group, implicit PRM")  # the longest of the rows DPO unlocked
    assert (0, "+ PPO group, oracle PRM") in runnable and (1, "+ DPO, single-action pairs") not in runnable
    assert (1, "+ DPO, single-action pairs", "backtrack SFT, factorized head") in blocked
    assert (1, "+ PPO group, oracle PRM") not in runnable + [(s, n) for s, n, _ in blocked]  # waits on a blocked row


@pytest.mark.parametrize("argv, message", [
    (["--error_kinds", "digit", "typo"], "error_kinds: unknown value 'typo'"),
    (["--task", "arithmetic:check=3"], "check must be 0"),
    (["--max_new_tokens", "-1"], "max_new_tokens"),
    (["--use_lora", "false"], "add --kl_coef 0"),
    (["--stages", "base", "pop"], "stages: unknown value 'pop'"),
    (["--task", "deps", "--eval_task", "arithmetic"], "eval_task: 'arithmetic' is another task than 'deps'"),
    (["--task", "deps", "--error_kinds", "digit"], "error_kinds: unknown value 'digit' for the deps task"),
])
def test_bad_demo_settings_are_one_line_before_anything_is_written(tmp_path, capsys, argv, message):
    out = tmp_path / "demo"
    assert demo.main(["--output_dir", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def _stage_configs(monkeypatch, args, *calls):
    """The configs each stage call would train with (finished_run records them and skips the training)."""
    stages = importlib.import_module("halluc_rl.agents.stages")
    seen = []
    monkeypatch.setattr(stages, "finished_run", lambda out, configs: seen.append(configs) or True)
    for stage, *rest, kwargs in calls:
        getattr(stages, f"{stage}_stage")(args, *rest, **kwargs)
    return seen


def test_stage_configs_come_from_configs_demo_with_the_demo_options_on_top(tmp_path, monkeypatch):
    sft = importlib.import_module("halluc_rl.agents.sft")
    ppo = importlib.import_module("halluc_rl.agents.ppo")
    from halluc_rl.data.errors import PLAUSIBLE_KINDS

    args = demo.DemoArgs(seed=3, max_new_tokens=64, sft_epochs=1.5)
    (script, model_args, lora, config), (ppo_args, ppo_model, _) = _stage_configs(
        monkeypatch, args, ("sft", tmp_path / "sft", "plausible", "softmax", {}),
        ("ppo", tmp_path / "ppo", tmp_path / "sft", {"backtrack": False, "updates": 5}))  # an ablation row's value
    assert script == sft.SFTScriptArgs(task="arithmetic", num_train_problems=1500, task_seed=3,
                                       error_source="plausible", error_kinds=list(PLAUSIBLE_KINDS), error_rate=0.25,
                                       curriculum_caps=[1, 2], curriculum_boundaries=[1], backtrack_head="softmax",
                                       semantics="rewind")
    assert model_args.model_name_or_path == "tiny" and lora.use_lora
    expected = sft.SFTConfig(output_dir=str(tmp_path / "sft"), num_train_epochs=1.5, per_device_train_batch_size=32,
                             learning_rate=2e-3, lr_scheduler_type="cosine", warmup_steps=5, logging_steps=10,
                             save_strategy="no", report_to=[], use_cpu=True, activation_checkpointing=False, seed=3,
                             max_length=512, disable_tqdm=False)
    assert config.to_dict() == expected.to_dict()
    assert ppo_args == ppo.PPOArgs(
        output_dir=str(tmp_path / "ppo"), task="arithmetic", task_seed=3, num_problems=1500, updates=5,
        problems_per_update=16, group_size=4, max_new_tokens=64, backtrack=False, advantage="group",
        process_reward="oracle", process_credit="immediate", process_weight=1.0, learning_rate=3e-4, kl_coef=0.02,
        backtrack_cost=0.1, save_every=25, seed=3, report_to="none")
    assert ppo_model.model_name_or_path == str(tmp_path / "sft")


def test_a_stage_config_folder_of_ones_own_is_read_and_checked(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "stages"
    shutil.copytree(os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "demo"), folder)
    (folder / "ppo.yaml").write_text((folder / "ppo.yaml").read_text().replace("group_size: 4", "group_size: 8"))
    args = demo.DemoArgs(stage_configs=str(folder))
    ((ppo_args, _, _),) = _stage_configs(monkeypatch, args, ("ppo", tmp_path / "ppo", tmp_path / "sft", {}))
    assert ppo_args.group_size == 8 and ppo_args.updates == 100  # the file's value; the demo's on top
    (folder / "dpo.yaml").write_text("num_samples: 4\nnum_smaples: 2\n")
    out = tmp_path / "demo"
    assert demo.main(["--output_dir", str(out), "--stage_configs", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert "dpo.yaml: unknown options ['--num_smaples']" in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_the_deps_demo_takes_its_recipe_from_the_task_and_options_win():
    """``--task deps`` fills the options left unset with the deps recipe (configs/sft_tiny-deps.yaml's, evaluated on
    deps:steps=4); an option given keeps its value; arithmetic keeps the documented demo's."""
    from halluc_rl.config import parse_cli

    (arith,) = parse_cli([demo.DemoArgs], [], prog="demo")
    assert (arith.eval_task, arith.num_train_problems, arith.error_rate, arith.sft_epochs, arith.backtrack_head) == (
        "arithmetic", 1500, 0.25, 2, "factorized")
    (deps,) = parse_cli([demo.DemoArgs], ["--task", "deps", "--error_rate", "0.25"], prog="demo")
    assert (deps.eval_task, deps.num_train_problems, deps.num_eval_problems, deps.error_kinds, deps.error_rate,
            deps.sft_epochs, deps.backtrack_head) == ("deps:steps=4", 2000, 300, ["premature"], 0.25, 3, "softmax")
    (other,) = parse_cli([demo.DemoArgs], ["--task", "deps", "--eval_task", "deps:vars=8"], prog="demo")
    assert other.eval_task == "deps:vars=8"


def test_deps_stage_configs_are_the_pilots_and_the_retry_rows_are_the_grids_cells(tmp_path, monkeypatch):
    """The deps SFT stage is ``halluc-rl sft --config configs/sft_tiny-deps.yaml`` with the demo's seed and folder;
    a retry-data row is the ``halluc-rl pretrain`` cell of docs/efficacy.md, skipped once finished."""
    sft = importlib.import_module("halluc_rl.agents.sft")
    stages = importlib.import_module("halluc_rl.agents.stages")
    pretrain = importlib.import_module("halluc_rl.agents.pretrain")
    from halluc_rl.config import parse_cli, save_config

    args = demo.DemoArgs(task="deps", seed=2, semantics="retry")
    ((script, model_args, lora, config),) = _stage_configs(
        monkeypatch, args, ("sft", tmp_path / "sft", "plausible", "softmax", {}))
    (p_script, p_model, p_lora, p_config) = parse_cli(
        [sft.SFTScriptArgs, stages.ModelArgs, stages.LoraArgs, sft.SFTConfig],
        ["--config", "configs/sft_tiny-deps.yaml", "--output_dir", str(tmp_path / "sft"), "--seed", "2",
         "--task_seed", "2", "--semantics", "retry", "--report_to", "none", "--save_strategy", "no",
         "--logging_steps", "10", "--disable_tqdm", "false"], prog="sft")
    assert (script, model_args, lora) == (p_script, p_model, p_lora)
    ignored = ("save_steps", "save_total_limit")  # moot with checkpoint saving off, as in the demo
    assert ({k: v for k, v in config.to_dict().items() if k not in ignored}
            == {k: v for k, v in p_config.to_dict().items() if k not in ignored})
    monkeypatch.undo()  # the real finished_run from here on: the skip is under test
    trained = []
    monkeypatch.setattr(pretrain, "pretrain", lambda cfg: trained.append(cfg) or 0)
    stages.pretrain_stage(args, tmp_path / "r", 0.25, "rewind")
    (cell,) = parse_cli([pretrain.PretrainArgs], [
        "--task", "deps", "--init", "tiny-deps", "--error_rate", "0.25", "--error_kinds", "premature", "--semantics",
        "rewind", "--batch_size", "64", "--learning_rate", "1e-3", "--warmup_steps", "30", "--max_train_steps",
        "300", "--eval_every", "300", "--target_accuracy", "1.0", "--seed", "2", "--output_dir",
        str(tmp_path / "r")], prog="pretrain")
    assert trained == [cell]
    save_config(tmp_path / "r" / "config.yaml", cell)  # as a finished run leaves it
    (tmp_path / "r" / "log_history.json").write_text("[]")  # published last, with the weights
    (tmp_path / "r" / "model.safetensors").write_bytes(b"")
    stages.pretrain_stage(args, tmp_path / "r", 0.25, "rewind")
    assert len(trained) == 1  # skipped
    stages.pretrain_stage(args, tmp_path / "r", 0.5, "rewind")
    assert len(trained) == 2  # another config: trained again


@pytest.mark.parametrize("config, model", [("configs/demo_deps_smollm2-135m.yaml", "smollm2-135m"),
                                           ("configs/demo_deps_llama3.2-1b.yaml", "meta-llama/Llama-3.2-1B-Instruct")])
def test_the_real_model_demo_configs_parse_with_every_stage_config(config, model):
    """``halluc-rl demo --config configs/demo_deps_<model>.yaml`` (the GPU configs): every stage file parses with
    its command's dataclasses and the deps recipe fills what the file leaves unset."""
    stages = importlib.import_module("halluc_rl.agents.stages")
    from halluc_rl.config import parse_cli

    (args,) = parse_cli([demo.DemoArgs], ["--config", config], prog="demo")
    stages.check_stage_configs(args)
    assert (args.task, args.eval_task, args.error_kinds) == ("deps", "deps:steps=4", ["premature"])
    assert stages.base_model(args) == model and not stages.stage_config(args, "sft", {})[3].use_cpu


def test_ablation_rows_come_in_groups_per_task(tmp_path, capsys):
    from halluc_rl.agents.ablation import rows

    deps = demo.DemoArgs(task="deps")
    both = list(rows(deps, tmp_path))
    stages_only = list(rows(demo.DemoArgs(task="deps", rows=["stages"]), tmp_path))
    pretrain_only = list(rows(demo.DemoArgs(task="deps", rows=["pretrain"]), tmp_path))
    assert both == stages_only + pretrain_only and len(pretrain_only) == 7  # rate 0, and 3 rates x 2 semantics
    assert {"masked SFT, rewind", "masked SFT, retry", "full FT: masked SFT, retry", "+ PPO oracle, retry",
            "control: plain SFT + PPO, backtrack masked"} <= set(stages_only)
    out = tmp_path / "ablate"
    assert demo.main(["--task", "deps", "--ablate", "--rows", "pretrian", "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "rows: unknown group 'pretrian' on deps; use stages, pretrain" in err and len(err.splitlines()) == 1
    assert demo.main(["--rows", "stages", "--output_dir", str(out)]) == 2
    assert "add --ablate" in capsys.readouterr().err and not out.exists()


def test_the_retry_data_rows_give_accuracy_against_the_error_rate_per_semantics(tmp_path):
    """``--rows pretrain`` plots accuracy against the error rate, one line per semantics, from the same rows the
    table shows: rate 0 (the control) starts both lines, and a failed seed is left out of its point."""
    from halluc_rl.agents.ablation import rate_curves, retry_row, rows, write_summary

    args = demo.DemoArgs(task="deps", rows=["pretrain"], output_dir=str(tmp_path))
    names = list(rows(args, tmp_path))
    by_seed = {seed: {name: {"accuracy_greedy": 0.5 + 0.1 * seed + len(name) / 1000, "accuracy_sampled": 0.4}
                      for name in names} for seed in (0, 1)}
    by_seed[1][retry_row(0.25, "retry")] = {"error": "RuntimeError: boom"}
    write_summary(args, by_seed, minutes=1.0)
    assert (tmp_path / "accuracy_by_rate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curves = rate_curves({n: [by_seed[0][n], by_seed[1][n]] for n in names})
    assert list(curves) == ["rewind, greedy", "rewind, sampled", "retry, greedy", "retry, sampled"]
    control = len("retry data, rate 0") / 1000
    assert curves["rewind, greedy"][0.0] == curves["retry, greedy"][0.0] == [0.5 + control, 0.6 + control]
    assert curves["retry, greedy"][0.25] == [0.5 + len("retry data, rate 0.25, retry") / 1000]  # seed 1 failed
    assert curves["rewind, sampled"][0.5] == [0.4, 0.4]
    assert rate_curves({"plain SFT": [{"accuracy_greedy": 0.5}]}) == {}  # no retry rows, no curve
    stages_only = tmp_path / "stages"
    stages_only.mkdir()
    write_summary(demo.DemoArgs(task="deps", rows=["stages"], output_dir=str(stages_only)),
                  {0: {}}, minutes=1.0)
    assert not (stages_only / "accuracy_by_rate.png").exists()


def test_demo_ablation_and_stages_import_one_way():
    """demo -> ablation -> stages and demo -> stages: no module imports one that imports it back."""
    import ast

    agents = os.path.join(os.path.dirname(os.path.dirname(__file__)), "agents")

    def imports(name):
        tree = ast.parse(open(os.path.join(agents, f"{name}.py")).read())
        return {n.module.rsplit(".", 1)[-1] for n in ast.walk(tree)
                if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("halluc_rl.agents")}

    assert {"ablation", "stages"} <= imports("demo")
    assert "stages" in imports("ablation") and "demo" not in imports("ablation")
    assert not {"demo", "ablation"} & imports("stages")
