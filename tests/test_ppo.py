"""PPO: the first ratio is 1, it learns a toy task, each estimator runs, runs stop and resume, and two processes
follow one."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from halluc_rl.agents import ppo
from halluc_rl.args import LoraArgs, ModelArgs
from halluc_rl.backtrack import backtrack_token_id
from halluc_rl.checkpoints import checkpoint_problem
from halluc_rl.config import parse_cli
from halluc_rl.data.tasks import ArithmeticTask
from halluc_rl.rewards import CallableReward, OracleProcessReward, RewardMixer, RuleGrader
from halluc_rl.rollout import rollout
from halluc_rl.values import mc_states, mc_values
from tests.conftest import FULL, make_model

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = os.path.dirname(os.path.dirname(__file__))


def args(base_dir, out, *extra):
    return ["--model_name_or_path", str(base_dir), "--output_dir", str(out), "--num_problems", "64",
            "--problems_per_update", "8", "--group_size", "2", "--max_new_tokens", "12", "--updates", "2",
            "--report_to", "none", "--save_every", "1", "--learning_rate", "0.01", *extra]


def history(out):
    return json.loads((out / "log_history.json").read_text())


def test_the_first_epoch_ratio_is_exactly_one(base_dir, tmp_path):
    """One epoch of one minibatch: the update's log-probs are the sampling ones, so the approx KL and the clip
    fraction are 0 (the scorer reproduces the rollout exactly)."""
    out = tmp_path / "run"
    assert ppo.main(args(base_dir, out, "--epochs", "1", "--minibatches", "1", "--updates", "1")) == 0
    row = history(out)[0]
    assert row["losses/approx_kl"] == pytest.approx(0.0, abs=1e-6) and row["losses/clipfrac"] == 0.0


def test_ppo_learns_a_toy_task_where_the_right_action_is_known(base_dir, tmp_path, tokenizer):
    """Reward 1 when the one-token answer is a digit (10 of 320 tokens): the success rate must climb. Full
    fine-tuning: a random tiny model's frozen head spreads its logits too little for an adapter to move them far."""
    first_is_digit = CallableReward(lambda text, problem: float(text[:1].isdigit()), name="correct")
    out = tmp_path / "toy"
    parsed = parse_cli([ppo.PPOArgs, ModelArgs, LoraArgs],
                       args(base_dir, out, "--updates", "12", "--max_new_tokens", "1", "--problems_per_update", "16",
                            "--group_size", "4", "--learning_rate", "0.01", "--kl_coef", "0", "--save_every", "100",
                            "--use_lora", "false"), prog="test")
    assert ppo.train(*parsed, rewards=RewardMixer([first_is_digit])) == 0
    curve = [h["rollout/accuracy"] for h in history(out)]
    assert max(curve[:3]) < 0.1 and min(curve[-2:]) > 0.6, curve


@pytest.mark.parametrize("estimator, extra", [("gae", ()), ("mc", ("--mc_branches", "2")),
                                              ("group", ("--process_reward", "oracle", "--process_form", "min"))])
def test_each_advantage_estimator_runs_and_logs_its_metrics(base_dir, tmp_path, estimator, extra):
    out = tmp_path / estimator
    assert ppo.main(args(base_dir, out, "--advantage", estimator, "--kl_estimator", "k3", *extra)) == 0
    row = history(out)[-1]
    for key in ("losses/policy", "losses/approx_kl", "losses/clipfrac", "losses/entropy", "rollout/accuracy",
                "rollout/backtrack_rate", "rollout/kl", "rollout/reward_correct"):
        assert key in row and row[key] is not None
    if estimator == "gae":
        assert "losses/value" in row and "losses/explained_variance" in row
    assert (out / "adapter_model.safetensors").exists() and (out / "value_head.pt").exists()
    assert checkpoint_problem(out / "checkpoint-2") is None


def test_mc_states_sit_at_line_ends_and_around_backtracks(tokenizer):
    model = make_model("llama", tokenizer)
    bt = backtrack_token_id(tokenizer)
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"][-1]
    forced = torch.tensor([[7, newline, 8, bt, 9, 10]])
    ro = rollout(model, tokenizer, ArithmeticTask().problems("train", 1), forced_actions=forced, max_new_tokens=6,
                 eos_token_id=[])
    boundaries, states = mc_states(ro, {newline}, bt)
    # before 7 (start), before 8 (after a line), before <BT>, before 9 (after <BT>)
    assert boundaries[0].tolist() == [True, False, True, True, True, False]
    assert [(t, s) for _, t, s in states] == [(0, []), (2, [7, newline]), (3, [7, newline, 8]), (4, [7, newline])]
    # in retry a state is the action stream so far (the deleted 8 and its backtrack stay in the context), and the
    # Monte-Carlo branches go on from it
    retry = rollout(model, tokenizer, ArithmeticTask().problems("train", 1), forced_actions=forced, max_new_tokens=6,
                    eos_token_id=[], semantics="retry")
    _, states = mc_states(retry, {newline}, bt)
    assert [(t, s) for _, t, s in states] == [(0, []), (2, [7, newline]), (3, [7, newline, 8]),
                                              (4, [7, newline, 8, bt])]
    est = mc_values(model, tokenizer, retry.problems, [states[-1][2]], 2, max_new_tokens=3, eos_token_id=[],
                    semantics="retry", generator=torch.Generator().manual_seed(0))
    assert [s[:2] for s in est.sequences[0]] == [[7, newline]] * 2  # the visible text the branches go on from


def test_a_rollout_carries_its_process_rewards_apart_whatever_their_names(tokenizer):
    """PPO reads ``Rollout.process_rewards``: the process plug-ins' weighted parts, by kind, not by name."""
    model = make_model("llama", tokenizer, seed=4)
    problems = ArithmeticTask().problems("train", 2)

    def run(mixer):
        return rollout(model, tokenizer, problems, mixer, max_new_tokens=6, num_samples=2,
                       generator=torch.Generator().manual_seed(0))

    one = run(RewardMixer([RuleGrader(), (OracleProcessReward(tokenizer, name="oracle"), 0.5)]))
    assert torch.equal(one.process_rewards, one.reward_parts["oracle"])
    assert one.process_rewards.abs().sum() > 0
    two = run(RewardMixer([(OracleProcessReward(tokenizer, name="a"), 1.0),
                           (OracleProcessReward(tokenizer, name="b"), 2.0)]))
    torch.testing.assert_close(two.process_rewards, two.reward_parts["a"] + two.reward_parts["b"])
    none = run(RewardMixer([RuleGrader()]))
    assert torch.equal(none.process_rewards, torch.zeros_like(none.rewards))


def test_an_exploding_kl_stops_the_run_with_a_checkpoint(base_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code = ppo.main(args(base_dir, out, "--learning_rate", "0.5", "--max_kl", "1e-9", "--save_every", "100"))
    err = capsys.readouterr().err
    assert code == 3 and "update 1: the approx KL" in err and "saved checkpoint-1" in err
    assert checkpoint_problem(out / "checkpoint-1") is None and not (out / "adapter_model.safetensors").exists()


def test_bad_ppo_input_gets_one_line(tmp_path, capsys):
    assert ppo.main(["--advantage", "group", "--group_size", "1", "--output_dir", str(tmp_path / "x")]) == 2
    assert "group_size: the group baseline needs" in capsys.readouterr().err
    assert ppo.main(["--process_reward", "prm", "--output_dir", str(tmp_path / "x")]) == 2
    assert "prm_path" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_killed_ppo_run_resumes_from_its_last_checkpoint(base_dir, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "halluc_rl.cli", "ppo", *args(base_dir, out, "--updates", "12")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 180
    while time.time() < deadline and not (out / "checkpoint-3").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = [int(p.name.split("-")[1]) for p in out.glob("checkpoint-*") if checkpoint_problem(p) is None]
    assert done and not (out / "adapter_model.safetensors").exists()
    rerun = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"resuming from {out / f'checkpoint-{max(done)}'}" in rerun.stdout
    assert [h["update"] for h in history(out)] == list(range(1, 13))


def test_a_run_continuing_an_adapter_may_resume_from_its_checkpoints(base_dir, tmp_path):
    """A run started from a saved adapter (PPO after DPO) saves checkpoints on the adapter's own base: resuming
    them must compare that base, not the adapter's folder (the ablation's reruns were refused before)."""
    from halluc_rl.adapters import check_same_base

    start, run = tmp_path / "start", tmp_path / "run"
    assert ppo.main(args(base_dir, start, "--updates", "1")) == 0  # an adapter on base_dir
    assert ppo.main(args(start, run, "--updates", "1")) == 0  # PPO continuing it
    check_same_base(run / "checkpoint-1", str(start))  # its own start: accepted
    with pytest.raises(ValueError, match="was trained from base model"):
        check_same_base(run / "checkpoint-1", str(tmp_path / "another_base"))


@pytest.mark.slow
def test_two_processes_through_accelerate_follow_one(base_dir, tmp_path):
    """The same seeds: per-row sampling makes the rollouts identical, and the averaged gradients the updates."""
    if shutil.which("accelerate") is None:
        pytest.skip("accelerate's launcher is not on PATH")
    updates = "6" if FULL else "2"
    curves = []
    for processes in (1, 2):
        out = tmp_path / f"p{processes}"
        run = args(base_dir, out, "--updates", updates, "--advantage", "gae", "--save_every", "100")
        cmd = [sys.executable, "-m", "halluc_rl.agents.ppo", *run] if processes == 1 else [
            shutil.which("accelerate"), "launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "halluc_rl.agents.ppo", *run]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        curves.append(history(out))
    for one, two in zip(*curves):
        assert one["rollout/accuracy"] == two["rollout/accuracy"]
        for key in ("losses/policy", "losses/value", "rollout/kl"):
            assert two[key] == pytest.approx(one[key], rel=1e-3, abs=1e-4), key


def test_the_mc_advantage_of_a_backtrack_on_a_policy_with_known_values(tokenizer):
    """VinePPO's estimate from cached states on the scripted policy of tests/test_values.py: typing "8" then
    deleting it. V("") = p / (1 - (1-p) q) and V("8") = q V(""), so the deletion's advantage is V("") - V("8") minus
    its cost, and typing the wrong "8" gets V("8") - V("")."""
    from halluc_rl import losses
    from halluc_rl.data.tasks import Problem
    from halluc_rl.values import mc_values
    from tests.test_values import Scripted

    model = make_model("llama", tokenizer)
    script = Scripted(model, tokenizer, p=0.6, q=0.5)
    problem = Problem("What is 3 + 4?", "3 + 4 = 7\n#### 7", "7")
    bt = backtrack_token_id(tokenizer)
    forced = torch.tensor([[script.eight, bt, script.seven, tokenizer.eos_token_id]])
    ro = rollout(model, tokenizer, [problem], forced_actions=forced, max_new_tokens=4, loop_guard=None)
    boundaries, states = mc_states(ro, set(), bt)
    assert [t for _, t, _ in states] == [0, 1, 2]  # the start, before the backtrack, after it
    est = mc_values(model, tokenizer, [problem] * len(states), [s for _, _, s in states], 600, max_new_tokens=40,
                    loop_guard=None, generator=torch.Generator().manual_seed(0))
    values = torch.zeros_like(ro.rewards)
    for (b, t, _), v in zip(states, est.values.tolist()):
        values[b, t] = v
    cost = 0.1
    rewards = ro.rewards - cost * (ro.actions == bt).float()
    adv = losses.segment_advantages(rewards, ro.action_mask, boundaries, values)
    v_empty = 0.6 / (1 - 0.4 * 0.5)
    v_eight = 0.5 * v_empty
    tol = 4 * (0.25 / 600) ** 0.5 * 2  # two estimates, each within 4 standard errors
    assert adv[0, 0].item() == pytest.approx(v_eight - v_empty, abs=tol)  # typing the wrong digit
    assert adv[0, 1].item() == pytest.approx(v_empty - v_eight - cost, abs=tol)  # deleting it
    assert adv[0, 2].item() == pytest.approx(1.0 - v_empty, abs=tol)  # the right digit, then EOS: reward 1
    script.handle.remove()
