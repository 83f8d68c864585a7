"""The factorised backtrack head: its distribution, its loss, and generation/SFT using it consistently."""

import importlib

import pytest
import torch
import torch.nn.functional as F

from halluc_rl.backtrack import backtrack_token_id
from halluc_rl.generation import generate
from halluc_rl.losses import action_log_probs, factorized_backtrack_loss, factorized_log_probs
from halluc_rl.modeling import load_policy
from tests.conftest import make_model

pytestmark = pytest.mark.usefixtures("one_thread")
BT = 2


def test_factorized_distribution_is_normalised_and_sigmoid_for_backtrack():
    logits = torch.randn(3, 5, 7)
    logp = factorized_log_probs(logits, BT)
    torch.testing.assert_close(logp.logsumexp(-1), torch.zeros(3, 5), atol=1e-6, rtol=0)
    torch.testing.assert_close(logp[..., BT].exp(), torch.sigmoid(logits[..., BT]))
    others = torch.cat([logits[..., :BT], logits[..., BT + 1:]], -1)
    expected = torch.log_softmax(others, -1) + F.logsigmoid(-logits[..., BT:BT + 1])
    torch.testing.assert_close(torch.cat([logp[..., :BT], logp[..., BT + 1:]], -1), expected)
    torch.testing.assert_close(action_log_probs(logits, BT, "softmax"), torch.log_softmax(logits, -1))
    with pytest.raises(ValueError, match="backtrack_head"):
        action_log_probs(logits, BT, "sigmoid")


def test_factorized_loss_by_hand():
    logits = torch.randn(1, 4, 5, requires_grad=True)
    labels = torch.tensor([[-100, 3, BT, 4]])  # targets of positions 0, 1, 2: token 3, backtrack, token 4
    loss = factorized_backtrack_loss(logits, labels, BT)
    z = logits[0, :3, BT]
    bce = F.binary_cross_entropy_with_logits(z, torch.tensor([0.0, 1.0, 0.0]), reduction="sum")
    masked = logits[0, :3].clone()
    masked[:, BT] = float("-inf")
    ce = -(torch.log_softmax(masked[0], -1)[3] + torch.log_softmax(masked[2], -1)[4])
    torch.testing.assert_close(loss, (bce + ce) / 3)
    loss.backward()
    # the backtrack label at position 1 trains z only: the vocabulary logits there get no gradient
    assert torch.count_nonzero(logits.grad[0, 1, [0, 1, 3, 4]]) == 0 and logits.grad[0, 1, BT] != 0


def test_generation_samples_from_the_factorized_head(tokenizer):
    model = make_model("llama", tokenizer, seed=2)
    model.config.backtrack_head = "factorized"
    bt = backtrack_token_id(tokenizer)
    forced = torch.tensor([[7, bt, 8, 9]])
    out = generate(model, tokenizer, ["A box"], max_new_tokens=4, forced_actions=forced, return_logprobs=True,
                   eos_token_id=[], loop_guard=None)
    prompt = out.prompt_ids[0]
    for step, (visible, action) in enumerate([([], 7), ([7], bt), ([], 8), ([8], 9)]):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + visible])).logits[0, -1]
        scores = factorized_log_probs(logits, bt)
        if not visible:
            scores[bt] = float("-inf")  # no-op backtracks are masked on an empty response
        expected = torch.log_softmax(scores, -1)[action]
        torch.testing.assert_close(out.logprobs[0, step], expected, atol=1e-5, rtol=0)


def test_sft_with_the_factorized_head_trains_saves_and_reloads_it(tmp_path, tokenizer, monkeypatch):
    sft = importlib.import_module("halluc_rl.agents.sft")
    from halluc_rl.config import LoraArgs, ModelArgs, parse_config

    base = tmp_path / "base"
    make_model("llama", tokenizer, hidden_size=32).save_pretrained(base)
    tokenizer.save_pretrained(base)
    argv = ["--model_name_or_path", str(base), "--output_dir", str(tmp_path / "run"), "--num_train_problems", "16",
            "--per_device_train_batch_size", "4", "--max_steps", "3", "--learning_rate", "0.01",
            "--report_to", "none", "--use_cpu", "true", "--gradient_checkpointing", "false",
            "--save_strategy", "no", "--disable_tqdm", "true", "--error_rate", "1.0",
            "--backtrack_head", "factorized", "--logging_steps", "1"]
    calls: list[dict] = []

    def spy(logits, labels, backtrack_id, num_items=None):
        """The real factorised loss, recording what the trainer gave it and what it returned."""
        loss = factorized_backtrack_loss(logits, labels, backtrack_id, num_items)
        calls.append({"logits": logits.detach().float(), "labels": labels, "backtrack_id": backtrack_id,
                      "num_items": num_items, "loss": float(loss.detach())})
        return loss

    monkeypatch.setattr(sft, "factorized_backtrack_loss", spy)  # the name compute_loss calls
    trainer = sft.train(*parse_config([sft.SFTScriptArgs, ModelArgs, LoraArgs, sft.SFTConfig], argv))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    # every training step's loss is the factorised one: one call per step, and the logged loss is what it returned
    assert len(calls) == len(losses) == 3
    assert losses == pytest.approx([c["loss"] for c in calls], rel=1e-6)
    first = calls[0]
    bt = backtrack_token_id(tokenizer)
    assert first["backtrack_id"] == bt and int((first["labels"] == bt).sum()) > 0  # backtrack labels in the batch
    # ...and on that first batch the softmax cross-entropy (what compute_loss gives without the head) differs
    logits, labels = first["logits"][:, :-1], first["labels"][:, 1:]
    softmax = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                              reduction="sum") / first["num_items"]
    assert abs(float(softmax) - first["loss"]) > 0.1
    model, tok, _ = load_policy(tmp_path / "run")
    assert model.config.backtrack_head == "factorized"
    plain, _, _ = load_policy(base)
    assert getattr(plain.config, "backtrack_head", "softmax") == "softmax"
