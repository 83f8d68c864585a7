"""CUDA paths: skipped where there is no GPU (CI); run them on a GPU machine with `python -m pytest -m gpu`."""

import pytest
import torch
from transformers import AutoModelForTokenClassification

from halluc_rl.backtrack import backtrack_token_id
from halluc_rl.data.arithmetic import ArithmeticTask
from halluc_rl.rewards import HFProcessReward, RewardMixer, RuleGrader, Shaping
from halluc_rl.rollout import rollout
from halluc_rl.tiny import tiny_config
from tests.conftest import make_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rollout_with_a_prm_on_cuda_matches_cpu(tokenizer, dtype):
    """Policy and PRM on the GPU, the Rollout on the CPU; float32 matches the CPU run exactly in texts."""
    bt = backtrack_token_id(tokenizer)
    problems = ArithmeticTask(seed=0).problems("test", 4)
    forced = torch.where(torch.rand(4, 16, generator=torch.Generator().manual_seed(0)) < 0.3, bt, -1)

    def run(device, dtype):
        policy = make_model("llama", tokenizer).to(device, dtype)
        torch.manual_seed(0)
        cfg = tiny_config("llama", vocab_size=len(tokenizer), hidden_size=64, num_layers=2, num_labels=2)
        prm = AutoModelForTokenClassification.from_config(cfg).eval().to(device, dtype)
        mixer = RewardMixer([RuleGrader(), HFProcessReward(prm)], Shaping(backtrack_cost=0.1))
        return rollout(policy, tokenizer, problems, mixer, max_new_tokens=16, forced_actions=forced)

    gpu, cpu = run("cuda", dtype), run("cpu", torch.float32)
    assert gpu.rewards.device.type == "cpu" and gpu.rewards.shape == gpu.actions.shape
    assert torch.isfinite(gpu.rewards).all()
    if dtype == torch.float32:
        assert gpu.texts == cpu.texts
        torch.testing.assert_close(gpu.rewards, cpu.rewards, atol=1e-3, rtol=0)
