"""Process rewards against a fresh forward: the PRM's delta reward is potential-based shaping, checked step by step.

The potential Phi(s) of a state is the PRM's score of its visible prefix (or of its last completed step),
computed here from scratch with ``IncrementalScorer.rescore``; the rollout computes it incrementally, with a
rewound cache and left-padded prompts. Each action's reward must be Phi(s') - Phi(s), whatever the action did.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForTokenClassification

from halluc_rl.backtrack import ActionKind, apply_actions, backtrack_token_id
from halluc_rl.data.arithmetic import ArithmeticTask
from halluc_rl.rewards import HFProcessReward, RewardMixer
from halluc_rl.rollout import Rollout, rollout
from halluc_rl.tiny import tiny_config
from tests.conftest import make_model

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 24


def tiny_prm(tokenizer, seed: int = 0):
    """A random two-label token-classification PRM sharing the policy's tokenizer."""
    torch.manual_seed(seed)
    cfg = tiny_config("llama", vocab_size=len(tokenizer), hidden_size=64, num_layers=2, num_labels=2)
    return AutoModelForTokenClassification.from_config(cfg).eval()


def _forced(tokenizer, step_token: int) -> torch.Tensor:
    """[4, STEPS] actions: sampled tokens, many backtracks (a failed one first on row 0), step tokens typed and
    deleted, and row 2 stopping early on EOS."""
    bt = backtrack_token_id(tokenizer)
    g = torch.Generator().manual_seed(0)
    forced = torch.where(torch.rand(4, STEPS, generator=g) < 0.35, bt, -1)
    forced[:, 1::5] = step_token
    forced[0, 0] = bt  # a backtrack on the empty response: a no-op (a failed backtrack), reward 0
    forced[1, 6:9] = bt  # deletes the step token typed at 6... and what came before it
    forced[2, 12] = tokenizer.eos_token_id
    return forced


def _run(tokenizer, prm: HFProcessReward, step_token: int) -> Rollout:
    policy = make_model("llama", tokenizer)
    problems = ArithmeticTask(seed=0).problems("test", 4)  # prompts of different lengths: left padding
    return rollout(policy, tokenizer, problems, RewardMixer([prm]), max_new_tokens=STEPS, do_sample=True,
                   generator=torch.Generator().manual_seed(1), forced_actions=_forced(tokenizer, step_token))


def _potentials(ro: Rollout, b: int, bt: int, phi) -> list[float]:
    """Phi of row ``b``'s state before its first action and after each of its actions, from fresh forwards."""
    actions = ro.actions[b][ro.action_mask[b]].tolist()
    return [phi(ro.prompt_ids[b], apply_actions(actions[:s], bt).visible_ids) for s in range(len(actions) + 1)]


def _check_delta(ro: Rollout, bt: int, phi) -> None:
    """Each action's reward is Phi(s') - Phi(s); each episode sums to Phi(final) - Phi(prompt); padding gets 0."""
    assert set(ro.reward_parts) == {"prm"}
    for b in range(ro.actions.shape[0]):
        potentials = _potentials(ro, b, bt, phi)
        n = len(potentials) - 1
        expected = torch.tensor(potentials[1:]) - torch.tensor(potentials[:-1])
        torch.testing.assert_close(ro.rewards[b, :n], expected, atol=1e-4, rtol=0)
        assert ro.rewards[b, n:].abs().sum() == 0
        assert float(ro.returns[b]) == pytest.approx(potentials[-1] - potentials[0], abs=1e-4)
        assert potentials[0] == pytest.approx(phi(ro.prompt_ids[b], []), abs=0)


def test_delta_reward_is_the_change_of_a_fresh_prm_score(tokenizer):
    prm = HFProcessReward(tiny_prm(tokenizer), mode="delta")
    bt = backtrack_token_id(tokenizer)
    ro = _run(tokenizer, prm, step_token=9)
    # the forced pattern gives deletions and failed backtracks on every row but the last, and an early EOS
    assert ro.generation.num_deleted.tolist() == [7, 8, 3, 7] and ro.generation.num_failed.tolist() == [3, 3, 1, 0]
    assert ro.action_mask.sum(1).tolist() == [STEPS, STEPS, 13, STEPS]
    assert ro.generation.kinds[0, 0] == int(ActionKind.FAILED)

    def phi(prompt: list[int], visible: list[int]) -> float:
        return prm.scorer.rescore(prompt + visible)

    _check_delta(ro, bt, phi)
    assert float(ro.rewards[0, 0]) == 0.0  # the failed backtrack changed nothing
    # the PRM is not constant: a reward of the wrong sign would not pass the check above
    assert ro.rewards.abs().max() > 1e-3


def test_raw_reward_is_the_fresh_prm_score(tokenizer):
    prm = HFProcessReward(tiny_prm(tokenizer), mode="raw")
    bt = backtrack_token_id(tokenizer)
    ro = _run(tokenizer, prm, step_token=9)
    for b in range(4):
        potentials = _potentials(ro, b, bt, lambda prompt, visible: prm.scorer.rescore(prompt + visible))
        torch.testing.assert_close(ro.rewards[b, : len(potentials) - 1], torch.tensor(potentials[1:]), atol=1e-4,
                                   rtol=0)


def test_delta_reward_with_step_tokens_scores_the_last_completed_step(tokenizer):
    step = 9
    prm = HFProcessReward(tiny_prm(tokenizer, seed=1), mode="delta", step_token_ids=[step])
    bt = backtrack_token_id(tokenizer)
    ro = _run(tokenizer, prm, step_token=step)

    def phi(prompt: list[int], visible: list[int]) -> float:
        """The score of the longest visible prefix ending in a step token (the prompt's before the first)."""
        ends = [i + 1 for i, token in enumerate(visible) if token == step]
        return prm.scorer.rescore(prompt + visible[: ends[-1] if ends else 0])

    _check_delta(ro, bt, phi)
    # rewards arrive only when a step is completed or undone: most actions get exactly 0
    assert 0 < int((ro.rewards != 0).sum()) < int(ro.action_mask.sum()) // 2


def test_oracle_rewards_leaving_and_returning_to_the_reference(tokenizer):
    """Token granularity: -1 for the token that leaves the reference, +1 for the backspace back; step
    granularity: judged when a line ends; a premature EOS is wrong."""
    from halluc_rl.data.problems import encode_problem
    from halluc_rl.rewards import OracleProcessReward

    model = make_model("llama", tokenizer)
    problem = ArithmeticTask(seed=0).problems("test", 1)[0]
    _, ref = encode_problem(problem, tokenizer)
    bt = backtrack_token_id(tokenizer)
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"][0]
    cut = ref.index(newline)  # the first line's tokens are ref[:cut + 1]
    wrong = ref[cut - 1] + 1 if ref[cut - 1] + 1 != bt else ref[cut - 1] + 2
    actions = [*ref[: cut - 1], wrong, bt, *ref[cut - 1 : cut + 1], wrong, newline, bt, bt, tokenizer.eos_token_id]
    forced = torch.tensor([actions])
    token = OracleProcessReward(tokenizer, name="tok")
    step = OracleProcessReward(tokenizer, name="step", granularity="step", mode="raw")
    ro = rollout(model, tokenizer, [problem], RewardMixer([token, step]), forced_actions=forced,
                 max_new_tokens=len(actions), allow_failed_backtracks=True)
    k = cut - 1
    # wrong (-1), backspace (+1), the line's end (0, 0), wrong again (-1), newline (0), two backspaces (0, +1),
    # then an EOS before the answer is complete (-1)
    expected_token = [0.0] * k + [-1.0, 1.0, 0.0, 0.0, -1.0, 0.0, 0.0, 1.0, -1.0]
    assert ro.reward_parts["tok"][0].tolist() == expected_token
    # step: Phi is 1 until a line ends wrong; "wrong\n" is a wrong line (0) until its newline is deleted
    expected_step = [1.0] * (k + 5) + [0.0, 1.0, 1.0, 0.0]
    assert ro.reward_parts["step"][0].tolist() == expected_step


def test_a_reward_plug_in_that_raises_is_reported_with_its_episode(tokenizer):
    from halluc_rl.rewards import CallableReward, RewardError

    model = make_model("llama", tokenizer)
    problems = ArithmeticTask(seed=0).problems("test", 3)

    def picky(text, problem):
        if problem is problems[1]:
            raise KeyError("no grade for this one")
        return 1.0

    with pytest.raises(RewardError, match=r"outcome reward 'picky' raised KeyError.*episode 1: question '"
                       + problems[1].question[:20]):
        rollout(model, tokenizer, problems, RewardMixer([CallableReward(picky)]), max_new_tokens=3)
    broken = CallableReward(lambda prompt, visible: 1 / 0, kind="process", name="broken")
    with pytest.raises(RewardError, match=r"process reward .broken. raised ZeroDivisionError: division by zero at action 0 "
                       r"\(episode 0: question"):
        rollout(model, tokenizer, problems, RewardMixer([broken]), max_new_tokens=3)
