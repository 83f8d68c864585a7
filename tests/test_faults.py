"""Runs and the env under faults (issue 22): a locked run folder, a dead PPO/GRPO run, reward hacking warned
about, rewards replaced through the Python API, and a failed command that must not block the corrected one.

The environment's own refusals (a bool action, an unknown reset option) are in ``tests/test_env.py``.
"""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import types

import pytest
import torch

from halluc_rl import training
from halluc_rl.agents import dpo, grpo, ppo, prm, sft
from halluc_rl.args import LoraArgs, ModelArgs
from halluc_rl.checkpoints import LOCK_FILE, lock_run_dir, prepare_run_dir
from halluc_rl.config import NonFiniteError, parse_cli
from halluc_rl.rewards import RewardMixer, RuleGrader
from halluc_rl.training import DeadGradientStop, SafeTrainerMixin
from tests.conftest import make_model

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = os.path.dirname(os.path.dirname(__file__))
HOLD = ("import sys, time\nfrom halluc_rl.checkpoints import lock_run_dir\nwith lock_run_dir(sys.argv[1]):\n"
        "    print('locked', flush=True)\n    time.sleep(600)\n")


def ppo_argv(base_dir, out, *extra):
    return ["--model_name_or_path", str(base_dir), "--output_dir", str(out), "--num_problems", "64",
            "--problems_per_update", "4", "--group_size", "2", "--max_new_tokens", "8", "--updates", "3",
            "--report_to", "none", "--save_every", "100", "--learning_rate", "0.01", *extra]


def hold_lock(folder) -> subprocess.Popen:
    """A second process holding ``folder``'s run lock (it prints 'locked' once it has it)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.stdout.readline().strip() == "locked"
    return proc


@pytest.fixture
def locked_dir(tmp_path):
    folder = tmp_path / "busy"
    proc = hold_lock(folder)
    yield folder, proc
    proc.kill()
    proc.wait()


# -- 1. one run per folder: bad input of a second command, one line, exit 2 ----------------------------------------

COMMANDS = {"sft": sft.main, "dpo": dpo.main, "grpo": grpo.main, "prm": prm.main, "ppo": ppo.main}
BUSY = "is in use by another run (pid"


@pytest.mark.parametrize("command, argv, expected", [
    ("sft", ["--use_cpu", "true", "--report_to", "none"], BUSY),
    ("dpo", ["--use_cpu", "true", "--report_to", "none"], BUSY),
    ("grpo", ["--use_cpu", "true", "--report_to", "none"], BUSY),
    ("prm", ["--use_cpu", "true", "--report_to", "none"], BUSY),
    ("ppo", ["--report_to", "none"], BUSY),
])
def test_a_second_command_into_a_busy_run_folder_gets_one_line(locked_dir, capsys, monkeypatch, command, argv,
                                                               expected):
    """A command into a folder another process is running in is refused before it loads anything, naming the
    holder (pid, host, start time, command) and the fix; the holder's folder is left as it was."""
    folder, proc = locked_dir
    for module in (sft, dpo, grpo, prm):
        monkeypatch.setattr(module, "build_trainer", lambda *a, **k: pytest.fail("got past the lock"))
    monkeypatch.setattr(ppo, "set_up", lambda *a, **k: pytest.fail("got past the lock"))
    code = COMMANDS[command]([*argv, "--output_dir", str(folder)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith(f"halluc-rl {command}: ")
    assert expected in err and f"pid {proc.pid} on " in err and ", started 20" in err and "command: " in err
    assert err.endswith("wait for it to end, or use another output_dir")
    assert sorted(p.name for p in folder.iterdir()) == [LOCK_FILE]  # no config.yaml written


def test_the_lock_is_released_when_its_holder_is_killed(tmp_path):
    """``kill -9`` never leaves a stale lock: the OS drops it with the process."""
    folder = tmp_path / "run"
    proc = hold_lock(folder)
    with pytest.raises(Exception, match=f"pid {proc.pid}"):
        with lock_run_dir(folder):
            pass
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with lock_run_dir(folder) as path:
        assert f"pid {os.getpid()} on " in path.read_text()
    with lock_run_dir(folder, enabled=False) as path:  # another process of a distributed run takes none
        assert path is None


def test_two_identical_ppo_commands_do_not_both_run(base_dir, tmp_path):
    """The issue's repro: the same ppo command twice into one folder. The second is refused while the first runs,
    and the first's history has each update once."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "halluc_rl.cli", "ppo", *ppo_argv(base_dir, out, "--updates", "400")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "config.yaml").exists():
            time.sleep(0.05)
        second = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    finally:
        first.kill()
        first.wait()
    lines = second.stderr.strip().splitlines()
    assert second.returncode == 2 and f"pid {first.pid} on " in lines[-1] and " ppo " in lines[-1]
    assert [x for x in lines if x.startswith("halluc-rl ppo:")] == [lines[-1]]


# -- 2. a dead run stops: the one rule, PPO's updates -----------------------------------------------------------


@pytest.mark.parametrize("steps, stops_at, why", [
    ([(0.0, 0.0, 0.8)] * 5, None, None),  # zero advantages: zero gradient, zero loss, a live policy
    ([(0.0, 0.0, 0.0)] * 3, 2, "the policy has collapsed (entropy 0)"),
    ([(0.0, 0.3, None)] * 3, 2, "the loss is 0.3"),
    ([(0.0, 0.0, 0.0), (0.5, 0.1, 0.0), (0.0, 0.0, 0.0), (0.0, 0.0, 0.0)], 4,
     "the policy has collapsed (entropy 0)"),  # a live step resets the count
    ([(0.0, -0.2, 0.5)] * 4, None, None),  # a negative loss, a live policy
    ([(None, 1.0, 0.0)] * 4, None, None),  # no gradient norm known
])
def test_the_dead_gradient_rule(steps, stops_at, why):
    stop = DeadGradientStop(unit="update")
    for i, (norm, loss, entropy) in enumerate(steps, start=1):
        if i == stops_at:
            with pytest.raises(NonFiniteError, match=rf"^update {i}: the gradient norm has been 0 for 2 updates "
                                                     rf"while {re.escape(why)}.*no longer learns; advice$"):
                stop.observe(i, norm, loss, entropy, advice="advice")
            return
        stop.observe(i, norm, loss, entropy, advice="advice")
    assert stops_at is None


def dead_update(entropy: float):
    def update_policy(run, args, ro, adv, returns, old_values, update):
        return {"losses/grad_norm": [0.0, 0.0], "losses/loss": [0.0, 0.0], "losses/entropy": [entropy, entropy],
                "losses/approx_kl": [0.0, 0.0], "losses/policy": [0.0, 0.0], "losses/clipfrac": [0.0, 0.0]}
    return update_policy


def test_a_ppo_run_whose_policy_collapsed_stops_with_exit_3(base_dir, tmp_path, capsys, monkeypatch):
    """The issue's run: loss exactly 0, entropy 0, gradient norm 0, update after update. It stops at the second
    such update instead of saving its policy with exit 0."""
    out = tmp_path / "run"
    monkeypatch.setattr(ppo, "update_policy", dead_update(0.0))
    code = ppo.main(ppo_argv(base_dir, out))
    said = [x for x in capsys.readouterr().err.splitlines() if x.startswith("halluc-rl ppo:")]  # not tqdm's bars
    assert code == 3 and len(said) == 1
    assert said[0].startswith("halluc-rl ppo: stopped: update 2: the gradient norm has been 0 for 2 updates while the "
                          "policy has collapsed (entropy 0): the run diverged and no longer learns")
    assert not (out / "adapter_model.safetensors").exists()


def test_a_ppo_run_with_zero_gradients_but_a_live_policy_goes_on(base_dir, tmp_path, monkeypatch):
    """Zero advantages (every answer of a group rewarded alike) give a zero gradient legitimately."""
    out = tmp_path / "run"
    monkeypatch.setattr(ppo, "update_policy", dead_update(0.7))
    assert ppo.main(ppo_argv(base_dir, out)) == 0


def test_a_real_ppo_run_logs_its_gradient_norm_and_truncation_rate(base_dir, tmp_path):
    out = tmp_path / "run"
    assert ppo.main(ppo_argv(base_dir, out, "--updates", "2")) == 0
    rows = json.loads((out / "log_history.json").read_text())
    for row in rows:
        assert 0.0 <= row["rollout/truncated_rate"] <= 1.0 and row["losses/grad_norm"] > 0
        assert "losses/loss" in row and "rollout/backtrack_rate" in row


# -- 3. reward hacking is warned about ------------------------------------------------------------------------


def rows(*rates):
    return [{"update": i + 1, "rollout/backtrack_rate": b, "rollout/truncated_rate": t}
            for i, (b, t) in enumerate(rates)]


@pytest.mark.parametrize("history, warned", [
    (rows((0.02, 0.1), (0.03, 0.1), (0.6, 0.9)), ["rollout/backtrack_rate", "rollout/truncated_rate"]),
    (rows((0.02, 0.4), (0.7, 0.45)), ["rollout/backtrack_rate"]),  # truncation was already common
    (rows((0.1, 0.9), (0.1, 0.95)), []),  # high all along (an untrained policy): no jump
    (rows((0.1, 0.1), (0.29, 0.45)), []),  # 3x, but below 0.5
    (rows((0.9, 0.9)), []),  # the first update: nothing to compare with
    (rows((0.0, 0.0), (None, 0.0), (0.6, 0.0)), ["rollout/backtrack_rate"]),  # no action: no rate
])
def test_a_jump_of_the_backtrack_or_truncation_rate_is_warned(history, warned):
    lines = training.rate_jumps(history)
    assert [line.split(": ")[2].split(" jumped")[0] for line in lines] == warned
    for line in lines:
        assert line.startswith(f"warning: update {len(history)}: ") and "hacking its reward" in line
        assert "\n" not in line


# -- 4. rewards passed to train replace the configured ones, said in one line --------------------------------------


def test_rewards_passed_to_train_say_which_configured_ones_are_ignored(tmp_path, capsys, monkeypatch):
    class Stop(Exception):
        pass

    def set_up(*a, **k):
        raise Stop

    monkeypatch.setattr(ppo, "set_up", set_up)
    parsed = parse_cli([ppo.PPOArgs, ModelArgs, LoraArgs], ["--output_dir", str(tmp_path / "run"),
                                                           "--process_reward", "oracle", "--backtrack_cost", "0.1"],
                       prog="halluc-rl ppo")
    with pytest.raises(Stop):
        ppo.train(*parsed, rewards=RewardMixer([RuleGrader()]))
    out = capsys.readouterr().out.strip().splitlines()
    assert out == ["ppo: using the rewards passed to train(); the configured ones are ignored (process_reward "
                   "'oracle', backtrack_cost 0.1)"]
    with pytest.raises(Stop):
        ppo.train(*parsed)
    assert capsys.readouterr().out == ""


# -- 6. a failed command does not block the corrected one ---------------------------------------------------------


def sft_argv(base_dir, out, *extra):
    return ["--model_name_or_path", str(base_dir), "--output_dir", str(out), "--num_train_problems", "16",
            "--per_device_train_batch_size", "4", "--report_to", "none", "--use_cpu", "true", "--bf16", "false",
            "--max_steps", "1", "--save_strategy", "no", "--disable_tqdm", "true", *extra]


def test_a_command_that_failed_after_writing_its_config_does_not_block_the_corrected_one(base_dir, tmp_path,
                                                                                          capsys):
    """The issue's repro: sft on an empty GSM8K file. It is now refused before anything is written; a folder that
    an earlier failure left with only its config.yaml (as older versions did) does not block the corrected
    command either: it is not refused as 'a run with another config'."""
    out, empty = tmp_path / "run", tmp_path / "empty.jsonl"
    empty.write_text("")
    assert sft.main(sft_argv(base_dir, out, "--task", "gsm8k", "--data_files", str(empty))) == 2
    err = capsys.readouterr().err.strip()
    assert "data_files: no row of" in err and len(err.splitlines()) == 1 and not out.exists()
    out.mkdir()
    (out / "config.yaml").write_text("task: gsm8k\ndata_files: empty.jsonl\n")  # what a failed run used to leave
    assert sft.main(sft_argv(base_dir, out)) == 0
    said = capsys.readouterr().out
    assert f"replacing {out / 'config.yaml'}: its run left no checkpoint, weights or log_history.json" in said
    assert "task: arithmetic" in (out / "config.yaml").read_text()


@pytest.mark.parametrize("work", ["checkpoint-2", "adapter_model.safetensors", "log_history.json"])
def test_a_folder_holding_work_still_refuses_another_config(tmp_path, work):
    """Only a folder without a checkpoint, weights or history counts as new."""
    out = tmp_path / "run"
    first = parse_cli([ppo.PPOArgs, ModelArgs, LoraArgs], ["--output_dir", str(out)], prog="halluc-rl ppo")
    other = parse_cli([ppo.PPOArgs, ModelArgs, LoraArgs], ["--output_dir", str(out), "--learning_rate", "0.5"],
                      prog="halluc-rl ppo")
    prepare_run_dir(out, first, resume=True, allow_change=False)
    (out / work).mkdir() if work.startswith("checkpoint") else (out / work).write_text("{}")
    with pytest.raises(Exception, match="holds a run with another config"):
        prepare_run_dir(out, other, resume=True, allow_change=False, announce=lambda _: None)
    (out / work).rmdir() if work.startswith("checkpoint") else (out / work).unlink()
    said = []
    prepare_run_dir(out, other, resume=True, allow_change=False, announce=said.append)
    assert said == [f"replacing {out / 'config.yaml'}: its run left no checkpoint, weights or log_history.json"]


class _ZeroNorms:
    """A stand-in for ``transformers.Trainer`` whose gradient norm is always 0 (loss 0: zero advantages)."""

    def __init__(self, entropy: float) -> None:
        self._last_loss, self._last_entropy = 0.0, entropy
        self.state, self.args = types.SimpleNamespace(global_step=0), types.SimpleNamespace(learning_rate=3e-3)

    def _get_grad_norm(self, model, grad_norm=None):
        return 0.0  # the real Trainer counts global_step after the optimiser step


class _GRPOStandIn(SafeTrainerMixin, _ZeroNorms):
    pass


def test_grpo_records_the_entropy_the_dead_gradient_stop_reads(tokenizer):
    """GRPO's loss pass records its largest action entropy; the mixin then stops a collapsed policy (entropy 0)
    whose gradient is 0, and lets a live one with zero advantages go on."""
    from halluc_rl.generation import BacktrackGenerationConfig

    model = make_model("llama", tokenizer, hidden_size=32)
    trainer = types.SimpleNamespace(backtrack_config=BacktrackGenerationConfig(do_sample=True),
                                    accelerator=types.SimpleNamespace(autocast=contextlib.nullcontext))
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    grpo.BacktrackGRPOTrainer._get_per_token_logps_and_entropies(trainer, model, ids, torch.ones_like(ids), 3,
                                                                  compute_entropy=True)
    assert trainer._last_entropy > 0.1
    live = _GRPOStandIn(entropy=trainer._last_entropy)
    for _ in range(4):
        live._get_grad_norm(None)
    dead = _GRPOStandIn(entropy=0.0)
    dead._get_grad_norm(None)
    dead.state.global_step += 1
    with pytest.raises(NonFiniteError, match=r"^step 2: the gradient norm has been 0 for 2 steps while the policy "
                                             r"has collapsed \(entropy 0\)"):
        dead._get_grad_norm(None)
