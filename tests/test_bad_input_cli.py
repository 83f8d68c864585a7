"""Bad input on every command: one line on stderr naming the problem and the fix, exit status 2, nothing written.

One table (command, argv, expected fragment) swept over every command's ``main(argv)``, in-process. Each case fails
in validation, before any model loads, so the sweep stays fast. ``{out}`` is the run folder the case must not
create, ``{file}`` an existing plain file, ``{fake_gguf}`` a file that is not GGUF, ``{missing}`` a path that does
not exist, ``{bad_yaml}`` / ``{unknown_key}`` / ``{nan_yaml}`` small config files.
"""

from __future__ import annotations

import pytest

from halluc_rl import cli as top
from halluc_rl.agents import demo, dpo, grpo, models, ppo, pretrain, prm, sft
from halluc_rl.agents import evaluate as eval_cli

MAINS = {
    "sft": sft.main, "dpo": dpo.main, "grpo": grpo.main, "prm": prm.main,
    "prm eval": lambda argv: prm.main(["eval", *argv]), "ppo": ppo.main, "eval": eval_cli.main,
    "pretrain": pretrain.main, "demo": demo.main, "models": models.main,
}
PAST_VALIDATION = [  # (module, attribute): the first step after a command's validation; reaching it fails the case
    (sft, "build_trainer"), (dpo, "build_trainer"), (grpo, "build_trainer"), (prm, "build_trainer"),
    (prm, "policy_labels"), (ppo, "set_up"), (eval_cli, "load_eval_policy"), (eval_cli, "evaluate_policy"),
    (pretrain, "train_tokenizer"), (demo, "run_pipeline"), (demo, "run_ablation"),
]
FINITE = "must be a finite number, got"
IS_A_FILE = "is a file; give a folder"

CASES = [
    # 1. non-finite numbers, refused up front by config.check_types (TRL's TrainingArguments included)
    ("eval", ["--temperature", "nan"], f"temperature: {FINITE} nan"),
    ("eval", ["--backtrack_bias", "nan"], f"backtrack_bias: {FINITE} nan (-inf is allowed: -inf means never backtrack)"),
    ("eval", ["--backtrack_bias", "inf"], f"backtrack_bias: {FINITE} inf (-inf is allowed"),
    ("ppo", ["--kl_coef", "nan"], f"kl_coef: {FINITE} nan"),
    ("ppo", ["--config", "{nan_yaml}"], f"kl_coef: {FINITE} nan"),
    ("ppo", ["--learning_rate", "inf"], f"learning_rate: {FINITE} inf"),
    ("ppo", ["--clip", "nan"], f"clip: {FINITE} nan"),
    ("ppo", ["--task", "gsm8k", "--data_files", "{broken_jsonl}"], "data_files: {broken_jsonl}, line 2: malformed JSON"),
    ("ppo", ["--task", "gsm8k", "--data_files", "{empty_jsonl}"], "data_files: no row of {empty_jsonl} has a parseable"),
    ("eval", ["--task", "gsm8k", "--data_files", "{broken_jsonl}"], "data_files: {broken_jsonl}, line 2: malformed"),
    ("sft", ["--learning_rate", "nan"], f"learning_rate: {FINITE} nan"),
    ("grpo", ["--max_grad_norm=-inf"], f"max_grad_norm: {FINITE} -inf"),
    ("dpo", ["--beta", "nan"], f"beta: {FINITE} nan"),
    ("prm", ["--temperature", "inf"], f"temperature: {FINITE} inf"),
    ("prm eval", ["--prm_threshold", "nan"], f"prm_threshold: {FINITE} nan"),
    ("pretrain", ["--learning_rate", "nan"], f"learning_rate: {FINITE} nan"),
    ("demo", ["--kl_coef", "nan"], f"kl_coef: {FINITE} nan"),
    # 2. a negative KL coefficient
    ("grpo", ["--beta", "-1"], "beta: must be >= 0, got -1.0"),
    ("dpo", ["--beta", "-1"], "beta: must be > 0, got -1.0"),
    # 3. data files for a task that reads none
    ("eval", ["--task", "arithmetic", "--data_files", "{file}"], "data_files: the arithmetic task does not read files"),
    ("sft", ["--data_files", "{file}"], "data_files: the arithmetic task does not read files"),
    # 4. an unknown device
    ("eval", ["--device", "tpu"], "device: unknown device 'tpu'; use auto, cpu, cuda or cuda:N (CUDA is"),
    ("prm eval", ["--device", "tpu"], "device: unknown device 'tpu'; use auto, cpu, cuda or cuda:N"),
    # 5. output_dir is an existing file (ppo's call to check_output_dir lives in agents/ppo.py)
    *[(cmd, ["--output_dir", "{file}"], f"output_dir: {{file}} {IS_A_FILE}")
      for cmd in ("sft", "dpo", "grpo", "prm", "prm eval", "ppo", "eval", "pretrain", "demo")],
    ("eval", ["--output_dir", "{file}/sub"], "output_dir: {file}/sub lies under {file}, which is a file"),
    # 6. models: not a GGUF file, an unknown model
    ("models", ["convert", "{fake_gguf}", "{out}"], "gguf_file: {fake_gguf} is not a GGUF file"),
    ("models", ["convert", "{missing}", "{out}"], "gguf_file: no such file {missing}"),
    ("models", ["get", "no-such-model"], "unknown model 'no-such-model'; choose one of"),
    # 7. unknown options: named, with the closest known one
    ("sft", ["--lerning_rate", "0.1"],
     "unknown option on the command line: --lerning_rate (did you mean --learning_rate?)"),
    ("ppo", ["--kl_coeff", "0.1", "--nonsense", "1"],
     "unknown options on the command line: --kl_coeff (did you mean --kl_coef?), --nonsense;"),
    ("grpo", ["--config", "{unknown_key}"], "unknown option on the --config file: --lerning_rate (did you mean"),
    # already handled: unknown task or value, negative counts, missing config file, bad YAML
    ("eval", ["--task", "chess"], "task: unknown value 'chess'"),
    ("sft", ["--num_train_problems", "-3"], "num_train_problems: must be >= 0, got -3"),
    ("dpo", ["--num_problems", "0"], "num_problems: must be > 0, got 0"),
    ("grpo", ["--task", "chess"], "task: unknown value 'chess'"),
    ("prm", ["--head", "ranking"], "head: unknown value 'ranking'"),
    ("prm eval", ["--num_problems", "0"], "num_problems: must be > 0, got 0"),
    ("ppo", ["--config", "{missing}"], "--config: no such file {missing}"),
    ("ppo", ["--num_problems", "-1"], "num_problems: must be > 0, got -1"),
    ("dpo", ["--config", "{bad_yaml}"], "is not valid YAML"),
    ("pretrain", ["--batch_size", "0"], "batch_size: must be > 0, got 0"),
    ("demo", ["--task", "gsm8k"], "task: the demo runs the offline tasks with an oracle and an embedded model"),
    ("eval", ["--policy", "{missing}"], "policy: '{missing}' does not exist"),
]


@pytest.fixture
def paths(tmp_path) -> dict[str, str]:
    (tmp_path / "plain.txt").write_text("not a folder\n")
    (tmp_path / "fake.gguf").write_bytes(b"PK\x03\x04 not gguf" * 4)
    (tmp_path / "bad.yaml").write_text("output_dir: [1\n")
    (tmp_path / "unknown.yaml").write_text("lerning_rate: 0.1\n")
    (tmp_path / "nan.yaml").write_text("kl_coef: .nan\n")
    (tmp_path / "broken.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n{broken\n')
    (tmp_path / "empty.jsonl").write_text("")
    return {"out": str(tmp_path / "out"), "file": str(tmp_path / "plain.txt"),
            "fake_gguf": str(tmp_path / "fake.gguf"), "missing": str(tmp_path / "missing"),
            "bad_yaml": str(tmp_path / "bad.yaml"), "unknown_key": str(tmp_path / "unknown.yaml"),
            "nan_yaml": str(tmp_path / "nan.yaml"), "broken_jsonl": str(tmp_path / "broken.jsonl"),
            "empty_jsonl": str(tmp_path / "empty.jsonl")}



@pytest.mark.parametrize("command, argv, expected", CASES, ids=[f"{c[0]}:{' '.join(c[1])}" for c in CASES])
def test_bad_input_gets_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch, paths, command, argv, expected):
    monkeypatch.setenv("HALLUC_RL_HOME", str(tmp_path / "home"))
    for module, name in PAST_VALIDATION:
        monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("got past validation"))
    before = sorted(p.name for p in tmp_path.iterdir())
    argv = [a.format(**paths) for a in argv]
    if command != "models" and "--output_dir" not in argv:
        argv = ["--output_dir", paths["out"], *argv]
    code = MAINS[command](argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert expected.format(**paths) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no run folder, no config.yaml


# -- 8. help that reads well ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["sft", "dpo", "grpo", "prm"])
def test_help_shows_the_projects_options_under_headers(capsys, command):
    with pytest.raises(SystemExit) as info:
        MAINS[command](["--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0
    epilog = " ".join(out.split("\n\n")[-1].replace("-\n", "-").split())
    for header in (f"options of halluc-rl {command}:", "model and tokenizer:", "LoRA adapter:", "run folder:",
                   "training (TRL/transformers; --help-all lists all of their options):"):
        assert header in out, header
    assert f"`halluc-rl {command} --help-all` lists them too" in epilog
    assert "--output_dir" in out and "--learning_rate" in out  # the inherited options most runs set
    assert "--warmup_steps" not in out and "--push_to_hub" not in out
    assert len(out.splitlines()) < 200


@pytest.mark.parametrize("command", ["sft", "grpo"])
def test_help_all_lists_the_inherited_options_under_their_own_header(capsys, command):
    with pytest.raises(SystemExit):
        MAINS[command](["--help-all"])
    out = capsys.readouterr().out
    assert "inherited TRL/transformers options:" in out and "--warmup_steps" in out and "--push_to_hub" in out
    assert out.index(f"options of halluc-rl {command}:") < out.index("inherited TRL/transformers options:")


def test_a_negated_flag_says_what_it_turns_off(capsys):
    with pytest.raises(SystemExit):
        sft.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--no_resume, --no-resume Set resume to false (turns off --resume" in out
    assert out.count("Resume from the newest complete checkpoint") == 1


def test_the_top_level_help_names_the_demos_stages(capsys):
    assert top.main(["--help"]) == 0
    demo_line = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("demo"))
    assert "SFT, DPO, PPO and a control arm" in demo_line and "evaluated" in demo_line


def test_help_parses_nothing_differently(tmp_path):
    """Grouping the help leaves parsing alone: a hidden inherited option still parses."""
    from halluc_rl.args import ModelArgs
    from halluc_rl.config import parse_cli

    *_, config = parse_cli([sft.SFTScriptArgs, ModelArgs, sft.LoraArgs, sft.SFTConfig],
                           ["--output_dir", str(tmp_path / "o"), "--warmup_steps", "3", "--no_resume"],
                           prog="halluc-rl sft")
    assert config.warmup_steps == 3


@pytest.mark.parametrize("value", ["-inf", "-1e-3", "-2"])
def test_a_negative_value_after_its_option_parses(value):
    """``--backtrack_bias -inf`` reads as the value, not as an unknown option (argparse alone rejects ``-inf``)."""
    from halluc_rl.config import parse_cli

    (args,) = parse_cli([eval_cli.EvalArgs], ["--backtrack_bias", value, "--num_problems", "3"], prog="halluc-rl eval")
    assert args.backtrack_bias == float(value) and args.num_problems == 3


def test_backtrack_bias_minus_inf_is_documented_and_accepted():
    """-inf is the one infinity a field documents ("never backtrack"); +inf and NaN stay refused."""
    from halluc_rl.config import UsageError, check_types

    check_types(eval_cli.EvalArgs(backtrack_bias=float("-inf")))
    with pytest.raises(UsageError, match="backtrack_bias: must be a finite number, got inf"):
        check_types(eval_cli.EvalArgs(backtrack_bias=float("inf")))
    assert "-inf: never backtrack" in eval_cli.EvalArgs.__dataclass_fields__["backtrack_bias"].metadata["help"]
