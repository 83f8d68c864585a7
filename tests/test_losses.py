"""The factorised backtrack heads: their distributions, their losses, and generation/SFT using them consistently."""

import importlib

import pytest
import torch
import torch.nn.functional as F

from halluc_rl.backtrack import backtrack_token_id
from halluc_rl.generation import generate
from halluc_rl.losses import (
    action_log_probs,
    factorized_backtrack_loss,
    factorized_log_probs,
    final_advantages,
)
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


def test_the_calibrated_head_is_the_softmax_in_value_and_the_factorized_head_in_its_gradient():
    logits = torch.randn(2, 4, 7) * 3
    logits[..., BT] += 12.0  # a raw backtrack logit far above the others: sigmoid(z) ~ 1, as SmolLM2's starts
    logp = action_log_probs(logits, BT, "calibrated")
    torch.testing.assert_close(logp, torch.log_softmax(logits, -1), atol=1e-5, rtol=0)  # the softmax, in value
    assert float(factorized_log_probs(logits, BT)[..., BT].exp().min()) > 0.99  # the factorized head starts at ~1
    torch.testing.assert_close(logp, factorized_log_probs(logits, BT, calibrated=True))

    labels = torch.tensor([[-100, 3, BT, 4]] * 2)  # targets of positions 0, 1, 2: token 3, backtrack, token 4
    leaf = logits.clone().requires_grad_(True)
    loss = factorized_backtrack_loss(leaf, labels, BT, calibrated=True)
    flat, targets = logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1)
    softmax_ce = F.cross_entropy(flat, targets, ignore_index=-100)
    torch.testing.assert_close(loss, softmax_ce)  # the loss's value is the softmax cross-entropy's
    assert abs(float(factorized_backtrack_loss(logits, labels, BT)) - float(softmax_ce)) > 1.0  # not the factorized
    loss.backward()
    # the backtrack label at position 1 trains z only, as in the factorized head; the softmax would push the rest down
    assert torch.count_nonzero(leaf.grad[:, 1, [0, 1, 3, 4, 5, 6]]) == 0 and bool((leaf.grad[:, 1, BT] != 0).all())
    soft = logits.clone().requires_grad_(True)
    F.cross_entropy(soft[:, :-1].reshape(-1, 7), targets, ignore_index=-100).backward()
    assert torch.count_nonzero(soft.grad[:, 1, [0, 1, 3, 4, 5, 6]]) == 12


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


@pytest.mark.parametrize("head", ["factorized", "calibrated"])
def test_sft_with_a_factorized_head_trains_saves_and_reloads_it(tmp_path, tokenizer, monkeypatch, head):
    sft = importlib.import_module("halluc_rl.agents.sft")
    from halluc_rl.args import LoraArgs, ModelArgs
    from halluc_rl.config import parse_config

    base = tmp_path / "base"
    make_model("llama", tokenizer, hidden_size=32).save_pretrained(base)
    tokenizer.save_pretrained(base)
    argv = ["--model_name_or_path", str(base), "--output_dir", str(tmp_path / "run"), "--num_train_problems", "16",
            "--per_device_train_batch_size", "4", "--max_steps", "3", "--learning_rate", "0.01",
            "--report_to", "none", "--use_cpu", "true", "--activation_checkpointing", "false",
            "--save_strategy", "no", "--disable_tqdm", "true", "--error_rate", "1.0",
            "--backtrack_head", head, "--logging_steps", "1"]
    calls: list[dict] = []

    def spy(logits, labels, backtrack_id, num_items=None, calibrated=False):
        """The real factorised loss, recording what the trainer gave it and what it returned."""
        loss = factorized_backtrack_loss(logits, labels, backtrack_id, num_items, calibrated=calibrated)
        calls.append({"logits": logits.detach().float(), "labels": labels, "backtrack_id": backtrack_id,
                      "num_items": num_items, "calibrated": calibrated, "loss": float(loss.detach())})
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
    assert first["calibrated"] == (head == "calibrated")
    # ...and on that first batch the softmax cross-entropy (what compute_loss gives without the head) differs from the
    # factorized loss, and equals the calibrated one in value
    logits, labels = first["logits"][:, :-1], first["labels"][:, 1:]
    softmax = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                              reduction="sum") / first["num_items"]
    if head == "factorized":
        assert abs(float(softmax) - first["loss"]) > 0.1
    else:
        assert first["loss"] == pytest.approx(float(softmax), rel=1e-4)
    model, tok, _ = load_policy(tmp_path / "run")
    assert model.config.backtrack_head == head
    plain, _, _ = load_policy(base)
    assert getattr(plain.config, "backtrack_head", "softmax") == "softmax"


# -- the reinforcement-learning maths ---------------------------------------------------------------------------

from halluc_rl.losses import (  # noqa: E402
    gae,
    gae_vectorized,
    group_advantages,
    kl_estimate,
    masked_mean,
    masked_whiten,
    min_form_rewards,
    ppo_policy_loss,
    ppo_value_loss,
    process_credit,
    segment_advantages,
)


def gae_loop(rewards, values, lengths, gamma, lam):
    """GAE one row and one step at a time, straight from the definition."""
    out = torch.zeros_like(rewards)
    for b, n in enumerate(lengths):
        running = 0.0
        for t in reversed(range(n)):
            next_value = float(values[b, t + 1]) if t + 1 < n else 0.0
            delta = float(rewards[b, t]) + gamma * next_value - float(values[b, t])
            running = delta + gamma * lam * running
            out[b, t] = running
    return out


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0)])
def test_gae_scan_and_vectorised_equal_the_loop(gamma, lam):
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(5, 9, generator=g), torch.randn(5, 9, generator=g)
    lengths = [9, 3, 1, 7, 5]
    mask = torch.arange(9).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    expected = gae_loop(rewards, values, lengths, gamma, lam)
    adv, ret = gae(rewards, values, mask, gamma, lam)
    adv_v, ret_v = gae_vectorized(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(adv_v, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ret, (expected + values) * mask)
    torch.testing.assert_close(ret_v, ret, atol=1e-5, rtol=1e-5)


def test_masked_statistics_on_hand_tensors():
    x = torch.tensor([[1.0, 3.0, 100.0], [5.0, -100.0, -100.0]])
    m = torch.tensor([[True, True, False], [True, False, False]])
    assert masked_mean(x, m) == 3.0
    assert masked_mean(x, m, dim=1).tolist() == [2.0, 5.0]
    w = masked_whiten(x, m)
    std = torch.tensor([1.0, 3.0, 5.0]).std(unbiased=False)
    torch.testing.assert_close(w[m], (torch.tensor([1.0, 3.0, 5.0]) - 3.0) / std)
    assert (w[~m] == 0).all()


def test_ppo_losses_on_hand_tensors():
    old = torch.log(torch.tensor([[0.5, 0.5]]))
    new = torch.log(torch.tensor([[0.75, 0.25]]))  # ratios 1.5 and 0.5
    adv = torch.tensor([[1.0, 1.0]])
    mask = torch.tensor([[True, True]])
    loss, clipfrac, kl = ppo_policy_loss(new, old, adv, mask, clip=0.2)
    # action 0: min(1.5, 1.2) * 1 -> 1.2 (clipped); action 1: min(0.5, 0.8) -> 0.5 (not clipped upwards)
    assert loss.item() == pytest.approx(-(1.2 + 0.5) / 2) and clipfrac.item() == 1.0
    assert kl.item() == pytest.approx(((0.5 - torch.log(torch.tensor(1.5))) + (-0.5 - torch.log(torch.tensor(0.5)))
                                       ).item() / 2)
    assert ppo_policy_loss(new, old, adv, mask, 0.2, normalizer=4)[0].item() == pytest.approx(-(1.2 + 0.5) / 4)
    values, old_v, ret = torch.tensor([[2.0]]), torch.tensor([[0.0]]), torch.tensor([[1.0]])
    one = torch.tensor([[True]])
    assert ppo_value_loss(values, old_v, ret, one, clip=None).item() == pytest.approx(0.5)
    # clipped prediction 0.5 has error 0.25; the unclipped 1.0: the larger (pessimistic) one is kept
    assert ppo_value_loss(values, old_v, ret, one, clip=0.5).item() == pytest.approx(0.5)


def test_kl_estimators():
    lp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    assert kl_estimate(lp, ref, "k1").tolist() == pytest.approx([0.5, -1.0])
    r = torch.exp(ref - lp)
    assert kl_estimate(lp, ref, "k3").tolist() == pytest.approx((r - 1 - torch.log(r)).tolist())
    assert (kl_estimate(lp, ref, "k3") >= 0).all()


def test_min_form_rewards_sum_to_the_future_minimum():
    phi = torch.tensor([[1.0, 0.0, 1.0, 1.0, 9.0], [0.5, 0.2, 0.7, 0.0, 0.0]])
    mask = torch.tensor([[True] * 4 + [False], [True, True, True, False, False]])
    r = min_form_rewards(phi, mask)
    returns = torch.flip(torch.cumsum(torch.flip(r, [1]), 1), [1])
    assert returns[0, :4].tolist() == [0.0, 0.0, 1.0, 1.0]  # the wrong state at t=1 caps everything before it
    assert returns[1, :3].tolist() == pytest.approx([0.2, 0.2, 0.7])
    assert (r[~mask] == 0).all()


def test_group_advantages_leave_one_out():
    rewards = torch.tensor([[0.0, 1.0], [0.0, 0.0], [0.0, 3.0], [2.0, 0.0]])  # two groups of two
    mask = torch.ones(4, 2, dtype=torch.bool)
    adv = group_advantages(rewards, mask, group_size=2)
    # group 1: returns 1 and 0; group 2: 3 and 2; each row's baseline is the other row's return
    assert adv[:, 0].tolist() == [1.0, -1.0, 1.0, -1.0]
    assert adv[:, 1].tolist() == [1.0 - 0.0, 0.0 - 1.0, 3.0 - 2.0, 0.0 - 3.0]


def test_segment_advantages_credit_a_backtrack_with_its_value_change():
    # actions: a b <BT> c d ; estimated states before actions 0, 2 (the backtrack) and 3 (after it)
    rewards = torch.tensor([[0.0, 0.0, -0.1, 0.0, 1.0]])
    mask = torch.ones(1, 5, dtype=torch.bool)
    boundaries = torch.tensor([[True, False, True, True, False]])
    values = torch.tensor([[0.5, 0.0, 0.2, 0.9, 0.0]])
    adv = segment_advantages(rewards, mask, boundaries, values)
    # a, b: V(before BT) - V(start) = 0.2 - 0.5; the backtrack: -0.1 + 0.9 - 0.2; c, d: 1.0 + 0 - 0.9
    assert adv[0].tolist() == pytest.approx([-0.3, -0.3, 0.6, 0.1, 0.1])


def test_process_credit_moves_the_process_part_where_each_option_says():
    rewards = torch.tensor([[0.5, -0.25, 1.0], [0.125, 0.0, 0.0]])  # outcome + shaping + process
    process = torch.tensor([[0.25, -0.5, 0.0], [0.125, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    same, none = process_credit(rewards, process, mask, "delta", "return")
    assert torch.equal(same, rewards) and same is not rewards and none is None
    seen, own = process_credit(rewards, process, mask, "delta", "immediate")
    assert torch.equal(seen, rewards - process) and torch.equal(own, process * mask)
    shaped = min_form_rewards(process, mask)
    seen, none = process_credit(rewards, process, mask, "min", "return")
    assert torch.equal(seen, rewards + (shaped - process)) and none is None
    seen, own = process_credit(rewards, process, mask, "min", "immediate")
    assert torch.equal(seen, rewards + (shaped - process) - shaped) and torch.equal(own, shaped * mask)
    with pytest.raises(ValueError, match="process credit"):
        process_credit(rewards, process, mask, "delta", "later")


def test_masked_whiten_reduces_its_three_sums():
    x = torch.tensor([[1.0, 3.0, 100.0], [5.0, -100.0, -100.0]])
    m = torch.tensor([[True, True, False], [True, False, False]])
    seen = []
    two_halves = masked_whiten(x, m, reduce=lambda stats: seen.append(stats.clone()) or stats * 2)
    assert torch.equal(seen[0], torch.tensor([9.0, 35.0, 3.0]))
    torch.testing.assert_close(two_halves, masked_whiten(x, m))
    assert (masked_whiten(x, torch.zeros_like(m)) == 0).all()  # nothing masked in: zeros, not NaN


def test_final_advantages_add_the_immediate_reward_then_whiten_over_the_mask():
    adv = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 0.0]])
    immediate = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 2.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    summed = torch.tensor([[1.0, 3.0, 3.0], [0.5, -1.0, 2.0]])
    torch.testing.assert_close(final_advantages(adv, immediate, mask, whiten=False), summed)
    torch.testing.assert_close(final_advantages(adv, None, mask, whiten=False), adv)
    out = final_advantages(adv, immediate, mask, whiten=True)
    kept = summed[mask.bool()]
    torch.testing.assert_close(out[mask.bool()], (kept - kept.mean()) / kept.std(unbiased=False), atol=1e-4, rtol=0)
    assert out[1, 2] == 0
