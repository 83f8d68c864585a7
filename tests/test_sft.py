"""Masked-error SFT: training changes what it should and nothing else; resume; save, reload, generate."""

import importlib
import json

import pytest
import torch
import yaml
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file

from halluc_rl.args import LoraArgs, ModelArgs
from halluc_rl.backtrack import backtrack_token_id
from halluc_rl.config import UsageError, parse_config
from halluc_rl.generation import generate
from halluc_rl.modeling import load_policy
from tests.conftest import make_model

sft = importlib.import_module("halluc_rl.agents.sft")  # agents/ is mapped into the package


pytestmark = pytest.mark.usefixtures("one_thread")


def configs(base_dir, out, *extra):
    argv = ["--model_name_or_path", str(base_dir), "--output_dir", str(out), "--num_train_problems", "16",
            "--per_device_train_batch_size", "4", "--learning_rate", "0.01", "--report_to", "none",
            "--use_cpu", "true", "--activation_checkpointing", "false", "--logging_steps", "1",
            "--disable_tqdm", "true", "--error_rate", "1.0", "--seed", "0", *extra]
    return parse_config([sft.SFTScriptArgs, ModelArgs, LoraArgs, sft.SFTConfig], argv)


@pytest.mark.parametrize("layout", ["rewind", "retry"])
def test_lora_sft_trains_adapter_and_backtrack_rows_only(base_dir, tmp_path, tokenizer, layout):
    script, model_args, lora, config = configs(base_dir, tmp_path / "run", "--max_steps", "3",
                                               "--save_strategy", "no", "--semantics", layout)
    trainer = sft.build_trainer(script, model_args, lora, config)
    model = trainer.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable) and any("trainable_tokens" in n for n in trainable)
    assert sum("trainable_tokens" in n for n in trainable) == 2  # input and (untied) output rows
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    after = dict(model.named_parameters())
    for name, param in after.items():
        changed = not torch.equal(before[name], param.detach())
        if layout == "rewind" and "embed_tokens.token_adapter" in name:
            # the rewind layout never feeds the backtrack token (nor does generation): its input row is unused
            assert not changed
        elif name in trainable:
            assert changed or "lora_A" in name, f"trainable {name} did not change"
        else:
            assert not changed, f"frozen base weight {name} changed"
    trainer.save_model(tmp_path / "run")
    saved = load_file(tmp_path / "run" / "adapter_model.safetensors")
    assert sum("trainable_tokens" in k for k in saved) == 2  # the backtrack rows travel with the adapter


def test_sft_saves_a_policy_that_reloads_and_generates_with_backtracks(base_dir, tmp_path):
    script, model_args, lora, config = configs(base_dir, tmp_path / "run", "--max_steps", "2",
                                               "--save_strategy", "no")
    trained = sft.train(script, model_args, lora, config).model
    model, tokenizer, bt = load_policy(tmp_path / "run")
    assert isinstance(model, PeftModel)
    base = make_model("llama", tokenizer, hidden_size=32)  # the base_dir model, rebuilt from its seed
    ids = torch.tensor([tokenizer("Question: Tom has 3 apples.\nAnswer: 3 + 4 = 7")["input_ids"]])
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
        raw = PeftModel.from_pretrained(base, str(tmp_path / "run")).eval()
        raw_logits, loaded_logits = raw(input_ids=ids).logits, model(input_ids=ids).logits
    # the saved adapter holds exactly the trained LoRA weights and backtrack rows (trainer.model's own forward runs
    # under the trainer's bf16 autocast, so weights are compared, not its logits)
    weights = get_peft_model_state_dict(trained)
    assert sum("lora_B" in k for k in weights) == 14 and sum("trainable_tokens" in k for k in weights) == 2
    for reloaded in (model, raw):
        again = get_peft_model_state_dict(reloaded)
        assert again.keys() == weights.keys()
        for key, value in weights.items():
            assert torch.equal(again[key], value.detach()), key
    torch.testing.assert_close(loaded_logits, raw_logits, atol=1e-6, rtol=0)  # load_policy == plain PEFT
    # ...and training moved them: the LoRA weights change the vocabulary logits, the backtrack row its own
    vocab = torch.arange(base_logits.shape[-1]) != bt
    assert (loaded_logits - base_logits)[..., vocab].abs().max() > 1e-3
    assert (loaded_logits - base_logits)[..., bt].abs().min() > 1e-3
    forced = torch.tensor([[7, bt, 8, -1, -1]])
    out = generate(model, tokenizer, ["Question: Tom has 3 apples.\nAnswer:"], max_new_tokens=5,
                   forced_actions=forced, eos_token_id=[])
    assert out.sequences[0][0] == 8 and int(out.num_deleted[0]) == 1
    resolved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert resolved["model_name_or_path"] == str(base_dir) and resolved["semantics"] is None  # the policy's own
    assert model.config.backtrack_semantics == "rewind"  # recorded with the saved policy


def test_resume_from_checkpoint_gives_the_same_run(base_dir, tmp_path):
    common = ("--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2")
    straight = sft.train(*configs(base_dir, tmp_path / "straight", *common))
    # the same run, stopped after its first checkpoint, then resumed from it
    first = sft.train(*configs(base_dir, tmp_path / "resumed", "--max_steps", "4", "--save_strategy", "steps",
                               "--save_steps", "2", "--num_train_epochs", "1"))
    del first
    losses_straight = [h["loss"] for h in straight.state.log_history if "loss" in h]
    import shutil

    shutil.rmtree(tmp_path / "resumed" / "checkpoint-4")
    resumed = sft.train(*configs(base_dir, tmp_path / "resumed", *common))
    losses_resumed = [h["loss"] for h in resumed.state.log_history if "loss" in h]
    assert losses_resumed[-2:] == pytest.approx(losses_straight[-2:], abs=1e-5)
    a = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)


def test_checkpoint_from_another_base_is_refused(base_dir, tmp_path, tokenizer):
    ckpt = tmp_path / "run" / "checkpoint-1"
    ckpt.mkdir(parents=True)  # a complete-looking checkpoint of another base
    (ckpt / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "some/other-model"}))
    (ckpt / "adapter_model.safetensors").write_bytes(b"")
    (ckpt / "config.json").write_text("{}")
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 1}))
    with pytest.raises(ValueError, match="some/other-model.*" + str(base_dir).replace("/", ".")):
        sft.train(*configs(base_dir, tmp_path / "run", "--max_steps", "1", "--save_strategy", "steps"))


def test_full_finetuning_and_plain_sft_baseline(base_dir, tmp_path):
    script, model_args, lora, config = configs(base_dir, tmp_path / "full", "--max_steps", "2", "--use_lora",
                                               "false", "--error_source", "none", "--save_strategy", "no")
    trainer = sft.build_trainer(script, model_args, lora, config)
    assert all(p.requires_grad for p in trainer.model.parameters())
    batch = next(iter(trainer.get_train_dataloader()))
    bt = backtrack_token_id(trainer.processing_class)
    assert int((batch["labels"] == bt).sum()) == 0  # no errors: the plain-SFT baseline on the same problems
    before = trainer.model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    trainer.train()
    assert not torch.equal(before, trainer.model.model.layers[0].self_attn.q_proj.weight)


def test_unknown_config_key_is_rejected_by_name(base_dir, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model_name_or_path: tiny\nuse_cpu: true\nlearning_rat: 0.1\n")
    with pytest.raises(ValueError, match="learning_rat"):
        parse_config([sft.SFTScriptArgs, ModelArgs, LoraArgs, sft.SFTConfig], ["--config", str(path)])


def test_missing_model_names_it_and_the_offline_alternative(tmp_path):
    script, model_args, lora, config = parse_config(
        [sft.SFTScriptArgs, ModelArgs, LoraArgs, sft.SFTConfig],
        ["--model_name_or_path", "not-a-local/model-xyz", "--output_dir", str(tmp_path), "--use_cpu", "true"])
    with pytest.raises(UsageError, match="not-a-local/model-xyz.*HF_HUB_OFFLINE.*tiny"):
        sft.train(script, model_args, lora, config)
    assert not (tmp_path / "config.yaml").exists()  # refused before anything was written
