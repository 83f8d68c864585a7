"""Process reward models: `halluc-rl prm` trains what it should and saves a PRM that plugs into HFProcessReward;
the implicit PRM equals fresh forwards with the adapter on and off; other tokenizers are refused; `prm eval`
reports every PRM on the same held-out labels."""

from __future__ import annotations

import importlib
import json

import pytest
import torch
from transformers import AutoModelForTokenClassification

from halluc_rl.adapters import make_lora_model
from halluc_rl.args import LoraArgs, ModelArgs
from halluc_rl.backtrack import apply_actions, backtrack_token_id
from halluc_rl.config import parse_config
from halluc_rl.data.arithmetic import ArithmeticTask
from halluc_rl.labels import step_token_ids
from halluc_rl.losses import action_log_probs
from halluc_rl.policy import set_policy_backtrack, write_policy_config
from halluc_rl.rewards import HFProcessReward, ImplicitProcessReward, RewardMixer
from halluc_rl.rollout import rollout
from halluc_rl.tiny import tiny_config, train_tokenizer
from tests.conftest import make_model

prm = importlib.import_module("halluc_rl.agents.prm")  # agents/ is mapped into the package

pytestmark = pytest.mark.usefixtures("one_thread")


def argv(base_dir, out, *extra) -> list[str]:
    return ["--policy", str(base_dir), "--model_name_or_path", str(base_dir), "--output_dir", str(out),
            "--num_train_problems", "4", "--samples_per_problem", "2", "--mc_k", "2", "--max_new_tokens", "16",
            "--mc_max_new_tokens", "8", "--per_device_train_batch_size", "4", "--learning_rate", "0.01",
            "--report_to", "none", "--use_cpu", "true", "--logging_steps", "1", "--disable_tqdm", "true",
            "--seed", "0", "--max_steps", "3", "--save_strategy", "no", "--lora_r", "4", *extra]


def _episode_check(ro, scorer, step_ids) -> None:
    """Each episode's PRM return is Phi(last completed step) - Phi(prompt), from fresh forwards."""
    for b in range(ro.actions.shape[0]):
        visible = ro.visible_ids[b]
        ends = [i + 1 for i, t in enumerate(visible) if t in step_ids]
        final = scorer.rescore(ro.prompt_ids[b] + visible[: ends[-1] if ends else 0])
        assert float(ro.returns[b]) == pytest.approx(final - scorer.rescore(ro.prompt_ids[b]), abs=1e-4)


def test_lora_prm_trains_adapter_and_head_only_and_saves_a_plain_prm(base_dir, tmp_path, tokenizer):
    parsed = parse_config([prm.PRMScriptArgs, ModelArgs, LoraArgs, prm.PRMConfig], argv(base_dir, tmp_path / "run"))
    trainer = prm.build_trainer(*parsed)
    model = trainer.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable) and any("score" in n for n in trainable)
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    for name, param in model.named_parameters():
        changed = not torch.equal(before[name], param.detach())
        if name in trainable:
            assert changed or "lora_A" in name, f"trainable {name} did not change"
        else:
            assert not changed, f"frozen base weight {name} changed"
    out = tmp_path / "saved"
    trainer.save_model(str(out))
    assert not (out / "adapter_config.json").exists()  # merged: a plain token-classification model
    loaded = HFProcessReward.from_pretrained(str(out), tokenizer, step_token_ids=step_token_ids(tokenizer))
    ids = torch.tensor([tokenizer("Question: Tom has 3 apples.\nAnswer: 3 + 4 = 7")["input_ids"]])
    model.eval()  # the head's dropout off, as in the loaded PRM
    with torch.no_grad():
        torch.testing.assert_close(loaded.scorer.model(input_ids=ids).logits, model(input_ids=ids).logits,
                                   atol=1e-4, rtol=0)
    policy = make_model("llama", tokenizer, hidden_size=32)
    problems = ArithmeticTask(seed=0).problems("test", 3)
    ro = rollout(policy, tokenizer, problems, RewardMixer([loaded]), max_new_tokens=16, do_sample=True,
                 generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(ro.rewards).all() and set(ro.reward_parts) == {"prm"}
    _episode_check(ro, loaded.scorer, set(step_token_ids(tokenizer)))


def test_prm_command_scalar_head_full_finetuning_and_label_reuse(base_dir, tmp_path, tokenizer, capsys):
    out = tmp_path / "run"
    assert prm.main(argv(base_dir, out, "--head", "scalar", "--use_lora", "false")) == 0
    history = json.loads((out / "log_history.json").read_text())
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForTokenClassification"]
    loaded = HFProcessReward.from_pretrained(str(out), tokenizer, mode="raw")
    assert loaded.scorer.model.config.num_labels == 1
    score = loaded.scorer.rescore(tokenizer("Question: Ann has 5.\nAnswer: 5")["input_ids"])
    assert 0.0 < score < 1.0  # the sigmoid of the one logit
    assert "labels: saved to" in capsys.readouterr().out
    assert prm.main(argv(base_dir, out, "--head", "scalar", "--use_lora", "false")) == 0
    assert "labels: reusing" in capsys.readouterr().out  # the rerun made no labels


def test_prm_command_resumes_from_its_checkpoint(base_dir, tmp_path, capsys):
    out = tmp_path / "run"
    steps = ["--save_strategy", "steps", "--save_steps", "2"]
    assert prm.main(argv(base_dir, out, *steps, "--max_steps", "2")) == 0
    assert (out / "checkpoint-2" / "adapter_model.safetensors").exists()  # checkpoints stay adapters
    capsys.readouterr()
    assert prm.main(argv(base_dir, out, *steps, "--max_steps", "4")) == 0
    printed = capsys.readouterr().out
    assert f"resuming from {out / 'checkpoint-2'}" in printed and "labels: reusing" in printed
    history = json.loads((out / "log_history.json").read_text())
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 3, 4]  # steps 1-2 come from the checkpoint
    assert not (out / "adapter_config.json").exists() and (out / "model.safetensors").exists()


def test_prm_command_refuses_bad_input_in_one_line(base_dir, tmp_path, tokenizer, capsys):
    assert prm.main(argv(base_dir, tmp_path / "a", "--head", "ranking")) == 2
    err = capsys.readouterr().err
    assert "head: unknown value 'ranking'" in err and err.count("\n") == 1
    assert not (tmp_path / "a").exists()  # nothing written
    other = tmp_path / "other"
    make_model("llama", train_tokenizer(["other words only\n#### 1"] * 8, vocab_size=300), hidden_size=32
               ).save_pretrained(other)
    train_tokenizer(["other words only\n#### 1"] * 8, vocab_size=300).save_pretrained(other)
    capsys.readouterr()
    assert prm.main(argv(base_dir, tmp_path / "b", "--model_name_or_path", str(other))) == 2
    captured = capsys.readouterr()
    assert "tokenizer is not the policy's" in captured.err and str(other) in captured.err
    assert captured.err.count("\n") == 1 and "labels:" not in captured.out  # refused before any labelling


def test_a_prm_with_another_tokenizer_is_refused(tmp_path, tokenizer):
    other = train_tokenizer(["other words only\n#### 1"] * 8, vocab_size=300)
    torch.manual_seed(0)
    model = AutoModelForTokenClassification.from_config(
        tiny_config("llama", vocab_size=len(other), hidden_size=32, num_layers=1, num_labels=2))
    path = tmp_path / "foreign_prm"
    model.save_pretrained(path)
    other.save_pretrained(path)
    tokenizer.name_or_path = "policy-tokenizer"
    with pytest.raises(ValueError, match="vocabularies differ") as err:
        HFProcessReward.from_pretrained(str(path), tokenizer)
    assert str(path) in str(err.value) and "'policy-tokenizer'" in str(err.value)
    HFProcessReward.from_pretrained(str(path), other)  # its own tokenizer is fine


@pytest.mark.parametrize("head", ["softmax", "factorized"])
def test_implicit_prm_equals_fresh_forwards_with_the_adapter_on_and_off(tokenizer, head):
    bt = backtrack_token_id(tokenizer)
    model = make_model("llama", tokenizer)
    set_policy_backtrack(model, bt, head)
    policy = make_lora_model(model, LoraArgs(lora_r=4, lora_target_modules=["q_proj", "v_proj"]), bt)
    torch.manual_seed(0)
    with torch.no_grad():  # a trained-looking adapter: the policy differs from its reference
        for name, param in policy.named_parameters():
            if "lora_B" in name or "trainable_tokens" in name:
                param.add_(0.3 * torch.randn_like(param))
    beta = 0.5
    implicit = ImplicitProcessReward(policy, beta)
    problems = ArithmeticTask(seed=0).problems("test", 3)  # prompts of different lengths: left padding
    steps = 16
    g = torch.Generator().manual_seed(0)
    forced = torch.where(torch.rand(3, steps, generator=g) < 0.35, bt, -1)
    forced[0, 0] = bt  # a failed backtrack on the empty answer
    ro = rollout(policy, tokenizer, problems, RewardMixer([implicit]), max_new_tokens=steps, do_sample=True,
                 generator=torch.Generator().manual_seed(1), forced_actions=forced, allow_failed_backtracks=True,
                 eos_token_id=[])
    assert int(ro.generation.num_deleted.sum()) > 3

    def log_probs(ids: list[int]) -> torch.Tensor:  # [V] next-action log-probs after ids
        return action_log_probs(policy(input_ids=torch.tensor([ids])).logits[0, -1], bt, head)

    for b in range(3):
        actions = ro.actions[b][ro.action_mask[b]].tolist()
        expected = []
        for s, action in enumerate(actions):
            ids = ro.prompt_ids[b] + apply_actions(actions[:s], bt).visible_ids
            with torch.no_grad():
                on = log_probs(ids)[action]
                with policy.disable_adapter():
                    off = log_probs(ids)[action]
            expected.append(beta * float(on - off))
        torch.testing.assert_close(ro.reward_parts["implicit"][b, : len(actions)], torch.tensor(expected),
                                   atol=1e-4, rtol=0)
        visible = ro.visible_ids[b]
        fresh = []  # rescore: the teacher-forced rewards of the visible answer's tokens
        for t, token in enumerate(visible):
            with torch.no_grad():
                on = log_probs(ro.prompt_ids[b] + visible[:t])[token]
                with policy.disable_adapter():
                    off = log_probs(ro.prompt_ids[b] + visible[:t])[token]
            fresh.append(beta * float(on - off))
        torch.testing.assert_close(implicit.rescore(ro.prompt_ids[b], visible), torch.tensor(fresh), atol=1e-4, rtol=0)
    assert ro.reward_parts["implicit"].abs().max() > 1e-2  # the adapter matters: zero rewards would not pass


def test_implicit_prm_needs_a_peft_policy(tokenizer):
    with pytest.raises(TypeError, match="PEFT policy"):
        ImplicitProcessReward(make_model("llama", tokenizer), 0.1)


def test_prm_eval_reports_every_prm_on_the_same_labels(base_dir, tmp_path, tokenizer):
    run = tmp_path / "prm"
    assert prm.main(argv(base_dir, run, "--max_steps", "1")) == 0
    adapter = tmp_path / "dpo"  # a PEFT policy on the same base, standing in for a DPO-trained one
    from halluc_rl.modeling import load_model

    policy = make_lora_model(load_model(str(base_dir)), LoraArgs(lora_r=4, lora_target_modules=["q_proj"]),
                             backtrack_token_id(tokenizer))
    with torch.no_grad():
        next(p for n, p in policy.named_parameters() if "lora_B" in n).add_(0.2)
    policy.save_pretrained(adapter)
    tokenizer.save_pretrained(adapter)
    write_policy_config(policy, adapter)
    out = tmp_path / "eval"
    rc = prm.main(["eval", "--policy", str(base_dir), "--num_problems", "3", "--samples_per_problem", "2",
                   "--mc_k", "2", "--max_new_tokens", "16", "--mc_max_new_tokens", "8", "--prm", str(run),
                   "--implicit_policy", str(adapter), "--output_dir", str(out)])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results) == ["oracle", "mc", "prm", "implicit"]
    assert results["oracle"]["f1"] in (1.0, None) and results["oracle"]["auc"] in (1.0, None)
    assert len({r["steps"] for r in results.values()}) == 1  # the same held-out labels for all
    assert (out / "labels-test" / "halluc_rl_labels.json").exists() and "| implicit |" in (out / "results.md").read_text()
