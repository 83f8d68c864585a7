"""Branching from cached states, and Monte-Carlo values: exact forks, and values a scripted policy makes known."""

import pytest
import torch

from halluc_rl.backtrack import backtrack_token_id
from halluc_rl.data.tasks import Problem, encode_problem
from halluc_rl.generation import (
    BacktrackGenerationConfig,
    decoding_log_probs,
    generate,
    mask_scores,
    row_generators,
)
from halluc_rl.losses import segment_advantages
from halluc_rl.rewards import RewardMixer, RuleGrader
from halluc_rl.rollout import rollout
from halluc_rl.values import mc_states, mc_values, vine_advantages
from tests.conftest import ARCHS, make_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("arch", ARCHS)
def test_forked_branches_match_a_fresh_forward(tokenizer, arch):
    """K branches of prefilled states (responses of different lengths), each backtracking into the written
    response differently: every action's log-prob equals a fresh forward over prompt + visible text."""
    model = make_model(arch, tokenizer, seed=3)
    bt = backtrack_token_id(tokenizer)
    prompts = [tokenizer("Question: Tom has 3 apples.\nAnswer:")["input_ids"], tokenizer("A box")["input_ids"]]
    written = [[7, 8, 9, 10], [11]]
    k = 3
    forced = torch.full((2 * k, 8), -1)
    forced[0, :3] = torch.tensor([bt, bt, 12])  # deletes into the written response
    forced[1, :2] = torch.tensor([13, bt])
    forced[3, :2] = torch.tensor([bt, 14])  # row 1's only written token
    forced[5, 2:5] = bt  # deletes both free tokens and the written one
    config = BacktrackGenerationConfig(max_new_tokens=8, do_sample=True, temperature=0.8, eos_token_id=[],
                                       loop_guard=None, return_logprobs=True)
    out = generate(model, tokenizer, prompts, config, responses=written, num_branches=k, forced_actions=forced,
                   generator=torch.Generator().manual_seed(0))
    assert out.actions.shape == (2 * k, 8) and out.prompt_ids[0] == out.prompt_ids[k - 1] == prompts[0]
    assert out.sequences[0][:3] == [7, 8, 12] and out.sequences[3][0] == 14
    assert len({tuple(s) for s in out.sequences[:k]}) > 1  # the branches went their own ways
    for row in range(2 * k):
        prompt, visible = prompts[row // k], list(written[row // k])
        spent = 0
        for s, action in enumerate(out.actions[row].tolist()):
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([prompt + visible])).logits[0, -1]
            scores = mask_scores(logits, bt, config, torch.tensor(len(visible)), torch.tensor(spent))
            expected = decoding_log_probs(scores, config)[action]
            torch.testing.assert_close(out.logprobs[row, s], expected, atol=1e-4, rtol=0)
            if action == bt:
                visible.pop()
                spent += 1
            else:
                visible.append(action)
        assert visible == out.sequences[row]


def test_rollout_groups_branch_from_one_prompt(tokenizer):
    model = make_model("llama", tokenizer)
    problems = [Problem("Tom has 3 apples. How many?", "3\n#### 3", "3"), Problem("Ann has 5.", "#### 5", "5")]
    ro = rollout(model, tokenizer, problems, RewardMixer([RuleGrader()]), num_samples=4, do_sample=True,
                 max_new_tokens=6, generator=torch.Generator().manual_seed(1))
    assert ro.actions.shape[0] == 8 and [p.answer for p in ro.problems] == ["3"] * 4 + ["5"] * 4
    assert ro.prompt_ids[0] == ro.prompt_ids[3] == encode_problem(problems[0], tokenizer)[0]
    assert len({tuple(s) for s in ro.visible_ids[:4]}) > 1


class Scripted:
    """A hook that makes a tiny model a policy with known values on the answer "7":

    from an empty response: "7" with probability p, else "8"; after "7": EOS; after "8": a backtrack with
    probability q, else EOS. So V("") = p / (1 - (1 - p) q), V("8") = q V(""), V("7") = 1.
    """

    def __init__(self, model, tokenizer, p: float, q: float):
        self.seven, self.eight = (tokenizer(d, add_special_tokens=False)["input_ids"][-1] for d in ("7", "8"))
        self.eos, self.bt = tokenizer.eos_token_id, backtrack_token_id(tokenizer)
        self.p, self.q = p, q
        self.handle = model.register_forward_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs, output):
        logits = output.logits  # [B, keep, V]
        last = kwargs["input_ids"][:, -logits.shape[1]:]  # [B, keep] the token each kept position was fed
        new = torch.full_like(logits, float("-inf"))
        log = torch.log
        empty = (last != self.seven) & (last != self.eight)
        new[..., self.seven] = torch.where(empty, log(torch.tensor(self.p)), float("-inf"))
        new[..., self.eight] = torch.where(empty, log(torch.tensor(1 - self.p)), float("-inf"))
        new[..., self.eos] = torch.where(last == self.seven, 0.0, torch.where(last == self.eight,
                                                                               log(torch.tensor(1 - self.q)),
                                                                               float("-inf")))
        new[..., self.bt] = torch.where(last == self.eight, log(torch.tensor(self.q)), float("-inf"))
        output.logits = new
        return output


def test_mc_values_on_a_policy_whose_values_are_known(tokenizer):
    model = make_model("llama", tokenizer)
    script = Scripted(model, tokenizer, p=0.6, q=0.5)
    problem = Problem("What is 3 + 4?", "3 + 4 = 7\n#### 7", "7")
    seven, eight = script.seven, script.eight
    states = [[], [eight], [seven]]
    est = mc_values(model, tokenizer, [problem] * 3, states, k=400, max_new_tokens=40, loop_guard=None,
                    generator=torch.Generator().manual_seed(0))
    v_empty = 0.6 / (1 - 0.4 * 0.5)  # 0.75
    expected = torch.tensor([v_empty, 0.5 * v_empty, 1.0])
    stderr = (expected * (1 - expected) / 400).sqrt()
    assert ((est.values - expected).abs() <= 4 * stderr + 1e-9).all(), (est.values, expected)
    assert est.successes.shape == (3, 400) and est.values[2] == 1.0
    assert all(seq[0] == seven for seq in est.sequences[2])
    script.handle.remove()


def test_per_row_generators_sample_the_same_answers_in_any_batch_split(tokenizer):
    from halluc_rl.generation import row_generators

    model = make_model("llama", tokenizer, seed=2)
    prompts = ["A box", "Tom has", "Ann buys 3", "Question: 5"]
    kw = dict(max_new_tokens=10, do_sample=True, temperature=1.3, eos_token_id=[])
    whole = generate(model, tokenizer, prompts, generator=row_generators([1, 2, 3, 4]), **kw)
    parts = [generate(model, tokenizer, prompts[i : i + 2], generator=row_generators([i + 1, i + 2]), **kw)
             for i in (0, 2)]
    assert whole.sequences == parts[0].sequences + parts[1].sequences
    assert len(set(map(tuple, whole.sequences))) == 4


def test_per_row_gumbel_sampling_draws_from_the_policy(tokenizer):
    """One action from one state, 4000 times: frequencies match the softmax within 5 standard errors."""
    from halluc_rl.generation import row_generators

    model = make_model("llama", tokenizer, seed=2)
    n = 4000
    out = generate(model, tokenizer, ["A box"] * n, generator=row_generators(range(n)), max_new_tokens=1,
                   do_sample=True, temperature=2.0, eos_token_id=[], return_logprobs=True)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([out.prompt_ids[0]])).logits[0, -1]
    logits[backtrack_token_id(tokenizer)] = float("-inf")  # the empty-response mask
    probs = torch.softmax(logits / 2.0, -1)
    counts = torch.bincount(out.actions[:, 0], minlength=probs.shape[0]).float() / n
    top = probs.argsort(descending=True)[:5]
    assert ((counts[top] - probs[top]).abs() <= 5 * (probs[top] * (1 - probs[top]) / n).sqrt()).all()


def test_vine_advantages_are_segment_advantages_of_mc_values_at_the_mc_states(tokenizer):
    """The one call PPO makes equals its parts: the states, one seeded stream per branch, the segment
    advantages (on the scripted policy, whose states have values between 0 and 1)."""
    model = make_model("llama", tokenizer)
    script = Scripted(model, tokenizer, p=0.6, q=0.5)
    problem = Problem("What is 3 + 4?", "3 + 4 = 7\n#### 7", "7")
    forced = torch.tensor([[script.eight, script.bt, script.seven, script.eos],
                           [script.bt, script.eight, script.bt, script.seven]])
    ro = rollout(model, tokenizer, [problem, problem], forced_actions=forced, max_new_tokens=4,
                 loop_guard=None)
    rewards = torch.arange(8, dtype=torch.float32).view(2, 4) / 8

    def seed(b, t, j):
        return 1000 * b + 10 * t + j

    config = BacktrackGenerationConfig(do_sample=True, max_new_tokens=8, loop_guard=None)
    adv = vine_advantages(model, tokenizer, ro, rewards, set(), script.bt, 8, config, seed)
    boundaries, states = mc_states(ro, set(), script.bt)
    assert [(b, t) for b, t, _ in states] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (1, 3)]
    est = mc_values(model, tokenizer, [problem] * len(states), [s for _, _, s in states], 8, config,
                    prompts=[ro.prompt_ids[b] for b, _, _ in states],
                    generator=row_generators([seed(b, t, j) for b, t, _ in states for j in range(8)]))
    assert 0 < float(est.values.mean()) < 1
    values = torch.zeros_like(rewards)
    for (b, t, _), v in zip(states, est.values.tolist()):
        values[b, t] = v
    assert torch.equal(adv, segment_advantages(rewards, ro.action_mask, boundaries, values))
    script.handle.remove()
