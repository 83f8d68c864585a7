"""Damaged or unsafe saved policies are refused in one line, before anything loads or is written (issue 22)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from halluc_rl.adapters import make_lora_model
from halluc_rl.agents import dpo, ppo
from halluc_rl.agents import evaluate as eval_cli
from halluc_rl.args import LoraArgs
from halluc_rl.checkpoints import save_model_files
from halluc_rl.modeling import check_saved_model, load_model_and_tokenizer, load_policy

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A LoRA policy on the embedded model, saved as every stage saves one."""
    model, tokenizer, bt = load_model_and_tokenizer("tiny")
    policy = make_lora_model(model, LoraArgs(lora_r=2), bt)
    folder = tmp_path_factory.mktemp("policy")
    save_model_files(policy, tokenizer, folder)
    return folder


def damaged(adapter, tmp_path, how: str):
    folder = tmp_path / how
    shutil.copytree(adapter, folder)
    weights = folder / "adapter_model.safetensors"
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[:100])
    elif how == "no_weights":
        weights.unlink()
    elif how == "pickle_only":
        torch.save({"w": torch.zeros(1)}, folder / "adapter_model.bin")
        weights.unlink()
    elif how == "garbage_config":
        (folder / "adapter_config.json").write_text("{not json")
    elif how == "not_an_adapter_config":
        (folder / "adapter_config.json").write_text(json.dumps({"hello": 1}))
    return folder


CASES = [
    ("truncated", "adapter_model.safetensors is damaged"),
    ("no_weights", "holds no weights (adapter_model.safetensors)"),
    ("pickle_only", "holds adapter_model.bin only, a pickle halluc-rl does not load"),
    ("garbage_config", "adapter_config.json is not valid JSON"),
    ("not_an_adapter_config", "adapter_config.json is not a PEFT adapter config"),
]


def test_a_saved_policy_checks_out(adapter):
    check_saved_model(adapter)  # the intact folder passes
    model, _, _ = load_policy(adapter)
    assert hasattr(model, "peft_config")


@pytest.mark.parametrize("how, expected", CASES)
def test_load_policy_refuses_a_damaged_folder_naming_the_file(adapter, tmp_path, how, expected):
    with pytest.raises(ValueError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        load_policy(damaged(adapter, tmp_path, how))


@pytest.mark.parametrize("how, expected", CASES)
def test_every_command_refuses_it_in_one_line_and_writes_nothing(adapter, tmp_path, capsys, how, expected):
    folder = damaged(adapter, tmp_path, how)
    out = tmp_path / "out"
    runs = [
        ("eval", lambda: eval_cli.main(["--policy", str(folder), "--output_dir", str(out)])),
        ("ppo", lambda: ppo.main(["--model_name_or_path", str(folder), "--output_dir", str(out)])),
        ("dpo", lambda: dpo.main(["--model_name_or_path", str(folder), "--output_dir", str(out),
                                  "--use_cpu", "true"])),
        ("ppo implicit", lambda: ppo.main(["--process_reward", "implicit", "--prm_path", str(folder),
                                           "--output_dir", str(out)])),
    ]
    for name, run in runs:
        code = run()
        err = capsys.readouterr().err.strip()
        assert code == 2, (name, err)
        assert len(err.splitlines()) == 1 and expected in err, (name, err)
        assert not out.exists(), name


def test_a_prm_path_that_is_a_file_is_refused(tmp_path, capsys):
    file = tmp_path / "prm.safetensors"
    file.write_text("x")
    code = ppo.main(["--process_reward", "implicit", "--prm_path", str(file), "--output_dir", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "prm_path: give the PRM's (prm) or the policy's (implicit) directory" in err
    assert len(err.splitlines()) == 1
