"""Both backtrack semantics end to end, the way a user runs them: SFT -> DPO -> PPO -> eval, per semantics."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from halluc_rl.agents import dpo, evaluate, grpo, ppo, sft
from halluc_rl.modeling import load_policy
from halluc_rl.policy import saved_backtrack_settings

pytestmark = pytest.mark.usefixtures("one_thread")
COMMON = ["--report_to", "none", "--seed", "0"]
GRPO_CONFIG = Path(__file__).parent.parent / "configs" / "grpo_tiny.yaml"
TRL = [*COMMON, "--use_cpu", "true", "--disable_tqdm", "true", "--activation_checkpointing", "false"]


def adapter(path):
    return load_file(path / "adapter_model.safetensors")


@pytest.mark.parametrize("semantics", ["rewind", "retry"])
def test_sft_dpo_ppo_in_one_semantics(base_dir, tmp_path, capsys, semantics):
    """SFT records the semantics; DPO, PPO and GRPO continue in it (DPO and PPO move the adapter, the base does
    not; one GRPO step on four all-wrong groups has no advantage to follow); every saved policy reloads with it; eval runs in it, refuses the other in one line, and reports an explicit override."""
    sft_out, dpo_out, ppo_out = tmp_path / "sft", tmp_path / "dpo", tmp_path / "ppo"
    assert sft.main(["--model_name_or_path", str(base_dir), "--output_dir", str(sft_out), "--max_steps", "2",
                     "--num_train_problems", "8", "--per_device_train_batch_size", "4", "--save_strategy", "no",
                     "--learning_rate", "0.01", "--semantics", semantics, *TRL]) == 0
    assert dpo.main(["--model_name_or_path", str(sft_out), "--output_dir", str(dpo_out), "--max_steps", "1",
                     "--num_problems", "8", "--num_samples", "2", "--per_device_train_batch_size", "8",
                     "--max_new_tokens", "24", "--min_pairs", "2", "--save_strategy", "no", "--learning_rate",
                     "0.01", *TRL]) == 0
    assert ppo.main(["--model_name_or_path", str(dpo_out), "--output_dir", str(ppo_out), "--num_problems", "16",
                     "--problems_per_update", "4", "--group_size", "2", "--max_new_tokens", "12", "--updates", "1",
                     "--learning_rate", "0.01", *COMMON]) == 0
    grpo_out = tmp_path / "grpo"
    assert grpo.main(["--config", str(GRPO_CONFIG), "--model_name_or_path", str(dpo_out), "--output_dir",
                      str(grpo_out), "--num_train_problems", "8", "--per_device_train_batch_size", "4",
                      "--num_generations", "4", "--max_completion_length", "12", "--max_steps", "1",
                      "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true"]) == 0
    for out in (sft_out, dpo_out, ppo_out, grpo_out):
        assert saved_backtrack_settings(out)["backtrack_semantics"] == semantics
        assert load_policy(out)[0].config.backtrack_semantics == semantics
    for before, after in ((sft_out, dpo_out), (dpo_out, ppo_out)):  # each stage moved the adapter
        a, b = adapter(before), adapter(after)
        assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a), after
    base = load_file(base_dir / "model.safetensors")
    policy = load_policy(ppo_out)[0].get_base_model()
    weights = {k.replace(".base_layer", ""): v for k, v in policy.state_dict().items()}
    compared = [k for k in base if k in weights]
    assert len(compared) >= len(base) - 2  # all but the embedding and head, whose backtrack rows are adapters
    assert all(torch.equal(weights[k], base[k]) for k in compared)  # the base did not move
    other = "retry" if semantics == "rewind" else "rewind"
    ev = tmp_path / "eval"
    argv = ["--policy", str(ppo_out), "--num_problems", "4", "--num_samples", "1", "--max_new_tokens", "16",
            "--output_dir", str(ev)]
    assert evaluate.main(argv) == 0
    capsys.readouterr()
    assert evaluate.main([*argv, "--semantics", other]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("halluc-rl")]
    assert err == [f"halluc-rl eval: semantics: the policy was trained in {semantics!r}, not {other!r}; drop "
                   f"--semantics, or pass --override_semantics to run it in {other!r} anyway"]
    assert evaluate.main([*argv, "--semantics", other, "--override_semantics", "true", "--name", "override"]) == 0
    results = json.loads((ev / "results.json").read_text())["results"]
    assert results["ppo"]["semantics"] == semantics and not results["ppo"]["semantics_override"]
    assert results["override"]["semantics"] == other and results["override"]["semantics_override"]


def test_an_unknown_semantics_is_one_line_naming_the_two(base_dir, tmp_path, capsys):
    assert sft.main(["--model_name_or_path", str(base_dir), "--output_dir", str(tmp_path / "s"),
                     "--semantics", "undo", *TRL]) == 2
    assert capsys.readouterr().err.strip() == "halluc-rl sft: semantics: unknown value 'undo'; use one of rewind, retry"
    assert not (tmp_path / "s").exists()
