import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from transformers import AutoModelForTokenClassification

import halluc_rl  # noqa: F401  (registers the envs)
from halluc_rl.backtrack import backtrack_token_id
from halluc_rl.data.arithmetic import ArithmeticTask
from halluc_rl.data.problems import encode_problem
from halluc_rl.generation import generate
from halluc_rl.rewards import CallableReward, HFProcessReward, RewardMixer, RuleGrader, Shaping
from halluc_rl.rollout import rollout
from halluc_rl.tiny import tiny_config
from tests.conftest import make_model


def arithmetic_env(tokenizer, **kw):
    kw.setdefault("num_problems", 50)
    kw.setdefault("max_new_tokens", 32)
    return gym.make("Backtrack-Arithmetic-v0", tokenizer=tokenizer, **kw)


def tiny_prm(tokenizer, seed=0):
    torch.manual_seed(seed)
    cfg = tiny_config("llama", vocab_size=len(tokenizer), hidden_size=64, num_layers=2, num_labels=2)
    return AutoModelForTokenClassification.from_config(cfg).eval()


def test_check_env_arithmetic(tokenizer):
    check_env(arithmetic_env(tokenizer).unwrapped, skip_render_check=True)


def test_check_env_gsm8k_local(tokenizer, gsm8k_dir):
    env = gym.make("Backtrack-GSM8K-v0", tokenizer=tokenizer, data_files=str(gsm8k_dir), split="test",
                   max_new_tokens=16, max_prompt_tokens=1024)
    check_env(env.unwrapped, skip_render_check=True)
    obs, info = env.reset(seed=0)
    assert obs["prompt_length"] > 0 and info["answer"]


def test_seeded_two_env_determinism(tokenizer):
    envs = [arithmetic_env(tokenizer), arithmetic_env(tokenizer)]
    for env in envs:
        env.action_space.seed(123)
    traj = []
    for env in envs:
        obs, _ = env.reset(seed=7)
        steps = [obs]
        for _ in range(20):
            obs, reward, term, trunc, _ = env.step(env.action_space.sample())
            steps.append((obs, reward))
            if term or trunc:
                break
        traj.append(steps)
    assert len(traj[0]) == len(traj[1])
    for a, b in zip(traj[0][1:], traj[1][1:]):
        np.testing.assert_array_equal(a[0]["response_ids"], b[0]["response_ids"])
        assert a[1] == b[1]
    np.testing.assert_array_equal(traj[0][0]["prompt_ids"], traj[1][0]["prompt_ids"])


def test_backspace_semantics_and_info(tokenizer):
    env = arithmetic_env(tokenizer, backtrack_cost=0.1, failed_backtrack_penalty=0.5)
    bt = backtrack_token_id(tokenizer)
    env.reset(seed=0)
    _, r, *_ , info = env.step(bt)
    assert info["num_failed"] == 1 and r == pytest.approx(-0.6)
    env.step(7)
    obs, r, *_, info = env.step(bt)
    assert info["popped"] == [7] and obs["response_length"] == 0 and r == pytest.approx(-0.1)
    assert info["reward_parts"] == {"backtrack_cost": pytest.approx(-0.1), "failed_backtrack": 0.0}


def test_episode_end_and_bad_actions(tokenizer):
    env = arithmetic_env(tokenizer, max_new_tokens=3)
    with pytest.raises(RuntimeError, match="reset"):
        env.unwrapped.step(5)
    env.reset(seed=0)
    with pytest.raises(ValueError, match="invalid action"):
        env.step(len(tokenizer))
    with pytest.raises(ValueError, match="invalid action"):
        env.step(-1)
    _, _, term, trunc, _ = env.step(tokenizer.eos_token_id)
    assert term and not trunc
    with pytest.raises(RuntimeError, match="ended"):
        env.step(5)
    env.reset(seed=0)
    for _ in range(3):
        _, _, term, trunc, _ = env.step(5)
    assert trunc and not term


def test_outcome_reward_grades_the_answer(tokenizer):
    env = arithmetic_env(tokenizer, max_new_tokens=64)
    env.reset(seed=0, options={"index": 3})
    problem = env.unwrapped.problem
    bt = backtrack_token_id(tokenizer)
    ids = tokenizer(" " + problem.solution, add_special_tokens=False)["input_ids"]
    wrong = tokenizer(" 999", add_special_tokens=False)["input_ids"]
    for a in [*ids[:-2], *wrong, *[bt] * len(wrong), *ids[-2:], tokenizer.eos_token_id]:
        _, reward, term, _, info = env.step(a)
    assert term and reward == 1.0 and info["reward_parts"] == {"correct": 1.0}
    assert info["text"].strip() == problem.solution


def test_make_vec(tokenizer):
    envs = gym.make_vec("Backtrack-Arithmetic-v0", num_envs=3, tokenizer=tokenizer, num_problems=20,
                        max_new_tokens=8)
    obs, _ = envs.reset(seed=1)
    problems = ArithmeticTask().problems("train", 20)  # the env's default split and task seed
    longest = max(len(encode_problem(p, tokenizer)[0]) for p in problems)  # prompt room is sized from the data
    assert obs["prompt_ids"].shape == (3, longest)
    obs, rewards, *_ = envs.step(np.array([5, 6, 7]))
    assert obs["response_length"].tolist() == [1, 1, 1] and rewards.shape == (3,)
    envs.close()


def test_gsm8k_vec_env_on_local_files(tokenizer, gsm8k_dir):
    envs = gym.make_vec("Backtrack-GSM8K-v0", num_envs=2, tokenizer=tokenizer, data_files=str(gsm8k_dir),
                        split="test", max_prompt_tokens=1024, max_new_tokens=4)
    obs, _ = envs.reset(seed=0)
    assert obs["prompt_length"].min() > 0
    envs.close()


def test_prm_reward_equals_reencoded_score_after_backspaces(tokenizer):
    prm = HFProcessReward(tiny_prm(tokenizer), mode="raw")
    env = arithmetic_env(tokenizer, rewards=[RuleGrader(), prm], max_new_tokens=40)
    bt = backtrack_token_id(tokenizer)
    env.reset(seed=0)
    prompt = env.unwrapped.encode_prompt(env.unwrapped.problem)
    rng = np.random.default_rng(0)
    for t in range(30):
        action = bt if (t > 2 and rng.random() < 0.35) else int(rng.integers(5, len(tokenizer) - 1))
        _, _, _, _, info = env.step(action)
        expected = prm.scorer.rescore(prompt + env.unwrapped.visible_ids)
        assert info["reward_parts"]["prm"] == pytest.approx(expected, abs=1e-4)
    assert info["num_deleted"] > 3


def test_custom_reward_model_plugs_in(tokenizer):
    class LengthPenalty:  # the README's example
        name, kind = "length", "outcome"

        def score(self, texts, problems):
            return [-len(t) / 100 for t in texts]

    env = arithmetic_env(tokenizer, rewards=[(RuleGrader(), 1.0), (LengthPenalty(), 0.5),
                                            CallableReward(lambda text, p: 0.25, name="bonus")], max_new_tokens=2)
    env.reset(seed=0)
    env.step(5)
    _, reward, _, trunc, info = env.step(6)
    text = info["text"]
    assert trunc and info["reward_parts"]["length"] == pytest.approx(-0.5 * len(text) / 100)
    assert reward == pytest.approx(info["reward_parts"]["correct"] - 0.5 * len(text) / 100 + 0.25)
    with pytest.raises(TypeError, match="not a reward model"):
        arithmetic_env(tokenizer, rewards=[object()])


@pytest.mark.parametrize("semantics", ["rewind", "retry"])
def test_rollout_driver_matches_the_env(tokenizer, semantics):
    """The same action sequences through the env and through the driver, in either semantics: same texts, same
    rewards, the implicit PRM (which follows the policy's context) included."""
    from halluc_rl.policy import set_policy_backtrack
    from halluc_rl.rewards import ImplicitProcessReward
    from tests.test_scoring import lora_policy

    policy = lora_policy("llama", tokenizer, head="softmax")
    set_policy_backtrack(policy, backtrack_token_id(tokenizer), semantics=semantics)
    problems = ArithmeticTask(seed=0).problems("test", 4)
    bt = backtrack_token_id(tokenizer)

    def mixer():
        return RewardMixer([RuleGrader(), (HFProcessReward(tiny_prm(tokenizer)), 0.5),
                            (ImplicitProcessReward(policy, beta=1.0), 1.0)],
                           Shaping(backtrack_cost=0.05, failed_backtrack_penalty=0.1, budget_penalty=1.0, budget=4))

    g = torch.Generator().manual_seed(0)
    forced = torch.where(torch.rand(4, 24, generator=g) < 0.3, bt, -1)
    forced[1, 10] = tokenizer.eos_token_id  # one row stops early
    ro = rollout(policy, tokenizer, problems, mixer(), max_new_tokens=24, do_sample=True, generator=g,
                 forced_actions=forced)
    assert ro.action_mask[1].sum() == 11 and ro.dones[1, 10] and ro.generation.semantics == semantics
    for b, problem in enumerate(problems):
        env = gym.make("Backtrack-Arithmetic-v0", tokenizer=tokenizer, problems=[problem], max_new_tokens=24,
                       backtrack_budget=4, backtrack_cost=0.05, failed_backtrack_penalty=0.1, budget_penalty=1.0,
                       rewards=list(mixer().outcome + mixer().process), semantics=semantics)
        env.reset(seed=0)
        rewards = []
        for a in ro.actions[b][ro.action_mask[b]].tolist():
            obs, r, term, trunc, info = env.step(a)
            rewards.append(r)
        assert info["text"] == ro.texts[b]
        n = int(obs["num_actions"])
        assert obs["action_ids"][:n].tolist() == ro.actions[b][ro.action_mask[b]].tolist()
        torch.testing.assert_close(torch.tensor(rewards), ro.rewards[b][ro.action_mask[b]], atol=1e-4, rtol=0)
    assert ro.logprobs.shape == ro.actions.shape
    # the implicit reward at each action is the policy's log-ratio given the context of this semantics
    implicit = ro.reward_parts["implicit"]
    other = "retry" if semantics == "rewind" else "rewind"
    set_policy_backtrack(policy, bt, semantics=other)
    again = rollout(policy, tokenizer, problems, mixer(), max_new_tokens=24, do_sample=True, forced_actions=ro.actions,
                    generator=torch.Generator().manual_seed(0))
    assert again.texts == ro.texts and not torch.allclose(again.reward_parts["implicit"], implicit, atol=1e-4)


def test_an_unknown_semantics_is_refused_in_one_line(tokenizer):
    with pytest.raises(ValueError, match="semantics: unknown value 'undo'; use 'rewind'.*or 'retry'"):
        arithmetic_env(tokenizer, semantics="undo")


def test_default_env_needs_no_arguments_and_no_network(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    env = gym.make("Backtrack-Arithmetic-v0")  # the embedded tokenizer, the offline task
    obs, info = env.reset(seed=0)
    assert obs["prompt_length"] > 0 and info["answer"].isdigit()
    env.step(env.unwrapped.backtrack_id)
    check_env(env.unwrapped, skip_render_check=True)


def test_gsm8k_from_the_hub_offline_names_the_local_option(tokenizer):
    """The suite runs with HF_HUB_OFFLINE=1 (conftest, set before huggingface_hub reads it): no network retries."""
    with pytest.raises(ConnectionError) as err:
        gym.make("Backtrack-GSM8K-v0", tokenizer=tokenizer)
    assert "--data_files path/to/gsm8k" in str(err.value) and "data_files='path/to/gsm8k'" in str(err.value)


def test_prm_scores_steps_when_given_step_tokens(tokenizer):
    """With step_token_ids, the potential is the score of the last completed step; deleting a step's end undoes it."""
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"][0]
    prm = HFProcessReward(tiny_prm(tokenizer, seed=1), mode="raw", step_token_ids=[newline])
    env = arithmetic_env(tokenizer, rewards=[prm], max_new_tokens=12)
    bt = backtrack_token_id(tokenizer)
    env.reset(seed=0)
    prompt = env.unwrapped.encode_prompt(env.unwrapped.problem)
    prompt_score = prm.scorer.rescore(prompt)
    seen = []
    for action in [7, 8, newline, 9, bt, bt, bt, 10]:
        _, _, _, _, info = env.step(action)
        seen.append(info["reward_parts"]["prm"])
    step_score = prm.scorer.rescore(prompt + [7, 8, newline])
    # before the first newline: the prompt's score; after it (and after typing/deleting 9): the step's score;
    # deleting the newline falls back to the prompt's score
    assert seen[:2] == pytest.approx([prompt_score] * 2, abs=1e-4)
    assert seen[2:5] == pytest.approx([step_score] * 3, abs=1e-4)
    assert seen[5:] == pytest.approx([prompt_score] * 3, abs=1e-4)
    assert step_score != pytest.approx(prompt_score, abs=1e-4)


def test_every_gsm8k_test_problem_resets_with_the_default_sizes(tokenizer, gsm8k_dir):
    """Prompt room and the action budget are sized from the split: no problem is too long for its env."""
    env = gym.make("Backtrack-GSM8K-v0", tokenizer=tokenizer, data_files=str(gsm8k_dir), split="test").unwrapped
    longest_answer = max(len(encode_problem(p, tokenizer)[1]) for p in env.problems)
    assert env.max_new_tokens == 2 * longest_answer > 256 and env.max_prompt_tokens > 256
    for index in range(len(env.problems)):
        obs, _ = env.reset(options={"index": index})
        assert 0 < obs["prompt_length"] <= env.max_prompt_tokens
    assert index == 1318


def test_non_positive_sizes_are_refused(tokenizer):
    with pytest.raises(ValueError, match="max_new_tokens must be a positive"):
        arithmetic_env(tokenizer, max_new_tokens=0)


def test_env_and_generation_end_episodes_alike(tokenizer):
    """One episode-end rule: the same action streams end at the same step, terminated (EOS, stop strings, after
    backtracks too) or truncated (the budget), in the env and in generation."""
    policy = make_model("llama", tokenizer)
    problem = ArithmeticTask(seed=0).problems("test", 1)[0]
    bt, eos = backtrack_token_id(tokenizer), tokenizer.eos_token_id
    pool = torch.tensor(tokenizer(" 3 + 4 =", add_special_tokens=False)["input_ids"] + [bt, bt, eos, 0])  # 0: pad
    g = torch.Generator().manual_seed(0)
    forced = pool[torch.randint(len(pool), (24, 12), generator=g)]  # [B, S] every action forced
    forced[:, :3] = forced[:, :3].where(forced[:, :3] != eos, bt)  # a few actions before EOS may come
    steps, stops = 12, ("=", "+ 4")
    out = generate(policy, tokenizer, [encode_problem(problem, tokenizer)[0]] * 24, max_new_tokens=steps,
                   forced_actions=forced, stop_strings=stops, eos_token_id=eos, allow_failed_backtracks=True)
    env = gym.make("Backtrack-Arithmetic-v0", tokenizer=tokenizer, problems=[problem], max_new_tokens=steps,
                   stop_strings=stops, eos_token_id=eos)
    ends = set()
    for b in range(24):
        env.reset(seed=0)
        for a in out.actions[b][out.action_mask[b]].tolist():
            assert not env.unwrapped._done
            _, _, term, trunc, info = env.step(a)
        assert (term, trunc) == (bool(out.finished[b]), not bool(out.finished[b]))
        assert info["text"] == out.texts[b]
        ends.add("eos" if out.sequences[b][-1:] == [eos] else "stop" if term else "budget")
    assert ends == {"eos", "stop", "budget"}


def test_a_bool_action_is_refused_not_read_as_token_1(tokenizer):
    env = arithmetic_env(tokenizer).unwrapped
    env.reset(seed=0)
    for action in (True, np.bool_(False)):
        with pytest.raises(TypeError, match=r"expected a token id \(an int in \[0, \d+\)\), not a bool"):
            env.step(action)
    assert env.step(np.int64(5))[4]["text"] == tokenizer.decode([5])  # ints and NumPy ints still are tokens


def test_an_unknown_reset_option_is_refused_naming_the_valid_ones(tokenizer):
    env = arithmetic_env(tokenizer).unwrapped
    with pytest.raises(ValueError, match=r"unknown reset option\(s\) \['indx'\]: BacktrackEnv.reset reads only "
                                         r"\['index'\]"):
        env.reset(options={"indx": 3})
    assert env.reset(options={"index": 3})[1]["answer"] == env.problems[3].answer
    env.reset(options={})  # an empty dict is no option at all
