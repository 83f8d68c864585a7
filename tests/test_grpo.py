"""GRPO on action streams: it trains what it should, every log-prob comes from the shared scorer (the first ratio is
1), the rewards score the visible text, and the command line trains, saves and resumes the embedded policy."""

import importlib
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from halluc_rl.adapters import make_lora_model
from halluc_rl.args import LoraArgs
from halluc_rl.backtrack import apply_actions, backtrack_token_id
from halluc_rl.data.arithmetic import ArithmeticTask
from halluc_rl.data.problems import encode_problem
from halluc_rl.generation import BacktrackGenerationConfig
from halluc_rl.modeling import load_policy
from halluc_rl.rewards import CallableReward, OracleProcessReward, RewardMixer, RuleGrader
from halluc_rl.scoring import score_actions
from tests.conftest import make_model

grpo = importlib.import_module("halluc_rl.agents.grpo")  # agents/ is mapped into the package

pytestmark = pytest.mark.usefixtures("one_thread")
PROBLEMS = ArithmeticTask(seed=0).problems("train", 8)
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "grpo_tiny.yaml"


def length_reward(text, problem):
    return len(text) / 10.0  # varies within a group, so the advantages (and the gradients) are not zero


def make_trainer(tokenizer, tmp_path, rewards=None, bias=3.0, coef=0.0, reward_funcs=None, **overrides):
    """A LoRA policy on a tiny random Llama (untied head), one prompt x 4 generations per step, backtracks frequent."""
    model = make_model("llama", tokenizer, hidden_size=32)
    policy = make_lora_model(model, LoraArgs(lora_r=4, lora_alpha=8), backtrack_token_id(tokenizer))
    options = dict(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, num_generations=4,
                   max_completion_length=12, learning_rate=1e-2, max_steps=2, report_to="none", use_cpu=True,
                   activation_checkpointing=False, logging_steps=1, disable_tqdm=True, save_strategy="no", seed=0)
    args = grpo.GRPOConfig(**{**options, **overrides})
    return grpo.BacktrackGRPOTrainer(
        policy, args, grpo.problem_dataset(PROBLEMS, tokenizer), tokenizer,
        rewards=rewards or RewardMixer([CallableReward(length_reward)]),
        reward_funcs=reward_funcs, generation_config=BacktrackGenerationConfig(backtrack_bias=bias),
        process_advantage_coef=coef)


def group_rows(trainer, index=0):
    """The generation batch TRL's sampler would give: one dataset row repeated num_generations times."""
    return [dict(trainer.train_dataset[index]) for _ in range(trainer.num_generations)]


def test_two_grpo_steps_train_the_adapter_and_backtrack_row_only(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path, beta=0.04)
    model = trainer.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable) and any("lm_head.token_adapter" in n for n in trainable)
    result = trainer.train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history if "loss" in h)
    for name, param in model.named_parameters():
        changed = not torch.equal(before[name], param.detach())
        if name in trainable and "embed_tokens.token_adapter" not in name:  # a backtrack is never an input
            assert changed or "lora_A" in name, f"trainable {name} did not change"
        elif name not in trainable:
            assert not changed, f"frozen {name} changed"  # the base, and TRL's "ref" adapter
    assert any(".ref" in n for n in before)  # beta > 0 on a PEFT policy: TRL keeps the reference as an adapter


def test_the_trainer_scores_action_streams_with_the_shared_scorer(tokenizer, tmp_path):
    """The loss's log-probs equal score_actions on the streams (not a causal forward over them), the old ones are
    the sampler's (ratio 1), and the reference is scored the same way inside TRL's adapter context."""
    trainer = make_trainer(tokenizer, tmp_path, beta=0.04, temperature=0.8, max_steps=1)
    model = trainer.model
    with torch.no_grad():  # after TRL copied the reference: the policy now differs from it
        for name, param in model.named_parameters():
            if "lora_B.default" in name:
                param.normal_(0, 0.05)
    bt, seen = backtrack_token_id(tokenizer), {}
    real_loss, real_logps = trainer._compute_loss, trainer._get_per_token_logps_and_entropies

    def spy_logps(*args, **kwargs):
        out = real_logps(*args, **kwargs)
        if kwargs.get("compute_entropy"):  # the loss's call
            seen["logps"] = out[0].detach().clone()
        return out

    def spy_loss(model_, inputs):
        prompts, actions = grpo.split_streams(torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
                                              torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1),
                                              inputs["completion_ids"].shape[1])
        with torch.no_grad():
            seen["scorer"] = score_actions(model, prompts, actions, trainer.backtrack_config).logprobs
            with model.disable_adapter():  # the fresh adapter's reference is the base model
                seen["reference"] = score_actions(model, prompts, actions, trainer.backtrack_config).logprobs
            ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
            mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, -actions.shape[1] - 1: -1]  # [B, K, V]
            logits[..., bt] += 3.0  # the same decoding rules: the bias, and no backtrack on an empty response
            logits[:, 0, bt] = float("-inf")
            seen["causal"] = torch.log_softmax(logits / 0.8, -1).gather(-1, actions.clamp(min=0)[..., None])[..., 0]
        seen["inputs"], seen["actions"] = inputs, actions
        return real_loss(model_, inputs)

    trainer._get_per_token_logps_and_entropies, trainer._compute_loss = spy_logps, spy_loss
    trainer.train()
    inputs, actions = seen["inputs"], seen["actions"]
    mask = actions >= 0
    assert int((actions == bt).sum()) >= 2  # the batch has backtracks
    torch.testing.assert_close(seen["logps"][mask], seen["scorer"][mask], atol=1e-5, rtol=0)
    ratio = (seen["logps"] - inputs["old_per_token_logps"])[mask].exp()
    torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-5, rtol=0)  # the first importance ratio
    torch.testing.assert_close(inputs["ref_per_token_logps"][mask], seen["reference"][mask], atol=1e-5, rtol=0)
    assert (seen["reference"] - seen["scorer"])[mask].abs().max() > 1e-3  # the reference really is another policy
    # a plain causal forward over the stream agrees until the first backtrack, and not after it: there, deleted
    # tokens (and backtrack tokens as inputs) condition the later actions
    after = ((actions == bt).long().cumsum(1) - (actions == bt).long()) > 0  # [B, K] a backtrack came before
    gap = (seen["causal"] - seen["scorer"]).abs()
    assert gap[mask & ~after].max() < 1e-4 and gap[mask & after].max() > 1e-2


def test_rollout_streams_are_what_the_reward_plugins_scored(tokenizer, tmp_path, monkeypatch):
    """The rollout_func's action streams, backtracks applied, are the texts the plug-ins scored (and the
    completions TRL's own reward functions get); the group branches from one prompt; per-token advantages."""

    class Recorder:
        name, kind = "recorder", "outcome"

        def __init__(self):
            self.texts = []

        def score(self, texts, problems):
            self.texts += list(texts)
            return [len(t) / 10.0 for t in texts]

    seen_by_user = []

    def user_reward(completions, **_):  # a plain TRL reward function: gets the visible texts
        seen_by_user.extend(completions)
        return [0.0] * len(completions)

    recorder = Recorder()
    mixer = RewardMixer([recorder, RuleGrader(), OracleProcessReward(tokenizer)])
    trainer = make_trainer(tokenizer, tmp_path, rewards=mixer, bias=5.0, coef=0.5, reward_funcs=[user_reward])
    assert trainer.reward_func_names == ["recorder", "correct", "oracle", "user_reward"]
    returned = {}

    def spy(prompts, trainer_):
        returned.update(grpo.backtrack_rollout(prompts, trainer_))
        return returned

    trainer.rollout_func = spy
    calls, real_rollout = [], grpo.rollout
    monkeypatch.setattr(grpo, "rollout", lambda *a, **k: calls.append((len(a[2]), k["num_samples"])) or
                        real_rollout(*a, **k))
    rows = group_rows(trainer)
    batch = trainer._generate_and_score_completions(rows)
    bt = backtrack_token_id(tokenizer)
    visible = [tokenizer.decode(apply_actions(ids, bt).visible_ids, skip_special_tokens=True)
               for ids in returned["completion_ids"]]
    assert visible == recorder.texts == returned["visible_text"] == seen_by_user
    assert [p["recorder"] for p in returned["reward_parts"]] == pytest.approx([len(t) / 10 for t in visible])
    assert sum(apply_actions(ids, bt).num_deleted for ids in returned["completion_ids"]) >= 2
    assert list(trainer._logs["rewards"]["recorder"]) == pytest.approx([len(t) / 10 for t in visible])  # TRL's
    assert calls == [(1, 4)]  # one problem: its 4 episodes branch from one prefilled prompt
    assert returned["prompt_ids"] == [encode_problem(PROBLEMS[0], tokenizer)[0]] * 4
    # per-token advantages: each action's is the sequence's plus coef x its process reward
    adv, process = batch["advantages"], torch.zeros(batch["advantages"].shape)
    for b, r in enumerate(returned["process_rewards"]):
        process[b, : len(r)] = torch.tensor(r)
    assert adv.shape == batch["completion_ids"].shape and process.abs().sum() > 0
    base = adv - 0.5 * process * batch["completion_mask"]
    torch.testing.assert_close(base[batch["completion_mask"].bool()],
                               base[:, :1].expand_as(base)[batch["completion_mask"].bool()])


def test_cli_trains_the_embedded_policy_saves_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--config", str(CONFIG), "--output_dir", str(out), "--num_train_problems", "8",
            "--per_device_train_batch_size", "4", "--num_generations", "4", "--max_completion_length", "16",
            "--save_steps", "1", "--report_to", "none", "--disable_tqdm", "true", "--lora_r", "4",
            "--lora_alpha", "8"]
    assert grpo.main([*argv, "--max_steps", "1"]) == 0
    assert (out / "checkpoint-1" / "config.json").exists()
    assert grpo.main([*argv, "--max_steps", "2"]) == 0
    assert "resuming from" in capsys.readouterr().out
    assert json.loads((out / "log_history.json").read_text())[-1]["step"] == 2
    saved = load_file(out / "adapter_model.safetensors")
    assert sum("trainable_tokens" in k for k in saved) == 2  # the backtrack rows travel with the adapter
    model, tokenizer, bt = load_policy(out)
    assert isinstance(model, PeftModel) and model.config.backtrack_token_id == bt
    assert grpo.main([*argv, "--max_steps", "2", "--top_p", "0.9"]) == 2  # inexact ratios are refused


def test_the_reference_adapter_keeps_a_trained_backtrack_row(tokenizer, tmp_path):
    """Going on from a trained adapter with beta > 0, TRL copies it into a "ref" adapter by names containing
    ``.default.``; the trainable-token rows (names ending in ``.default``) must be copied too."""
    model = make_model("llama", tokenizer, hidden_size=32)
    policy = make_lora_model(model, LoraArgs(lora_r=4, lora_alpha=8), backtrack_token_id(tokenizer))
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "trainable_tokens_delta" in name or "lora_B" in name:
                param.add_(torch.randn_like(param))  # as SFT leaves them
    args = grpo.GRPOConfig(output_dir=str(tmp_path), num_generations=4, per_device_train_batch_size=4, beta=0.04,
                           use_cpu=True, report_to="none", max_completion_length=8)
    trainer = grpo.BacktrackGRPOTrainer(policy, args, grpo.problem_dataset(PROBLEMS, tokenizer), tokenizer)
    params = dict(trainer.model.named_parameters())
    rows = [n for n in params if n.endswith("trainable_tokens_delta.default")]
    assert len(rows) == 2
    for name in rows + [n for n in params if "lora_B.default" in n]:
        assert torch.equal(params[name], params[name.replace(".default", ".ref")]), name
