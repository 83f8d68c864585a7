"""The ecosystem: a halluc-rl policy is an ordinary PEFT adapter that plain TRL trainers train and PEFT's own
loaders open offline, and normal runs raise no deprecation warning through halluc-rl's own calls."""

from __future__ import annotations

import importlib
import json
import traceback
import warnings
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import AutoPeftModelForCausalLM, PeftModel
from trl import GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer

import halluc_rl
from halluc_rl.adapters import BASE_NAME_KEY, base_model_name, expose_head_bias, make_lora_model
from halluc_rl.args import LoraArgs, ModelArgs
from halluc_rl.config import parse_config
from halluc_rl.data.arithmetic import ArithmeticTask
from halluc_rl.data.problems import format_prompt, format_solution
from halluc_rl.modeling import load_model, load_model_and_tokenizer, load_policy
from halluc_rl.policy import write_policy_config
from halluc_rl.registry import TINY_MODEL_DIR

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(halluc_rl.__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
PROBLEMS = ArithmeticTask(seed=0).problems("train", 4)


def digit_share(completions, **_):
    """A TRL reward function: the share of digits in each completion (it varies within a group)."""
    return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions]


@pytest.fixture(scope="module")
def saved_policy(tmp_path_factory) -> Path:
    """A LoRA policy on the embedded tiny model (untied head: its lm_head backtrack row is wrapped), saved by
    halluc-rl, with its backtrack rows moved off their initial values."""
    model, tokenizer, bt = load_model_and_tokenizer("tiny")
    policy = make_lora_model(model, LoraArgs(lora_r=4, lora_alpha=8), bt)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "trainable_tokens_delta" in name or "lora_B" in name:
                param.add_(0.01 * torch.randn(param.shape, generator=torch.Generator().manual_seed(0)))
    folder = tmp_path_factory.mktemp("policy") / "sft"
    policy.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    write_policy_config(policy, folder)
    return folder


def logits_of(model, tokenizer) -> torch.Tensor:
    ids = tokenizer([format_prompt(PROBLEMS[0].question, tokenizer)], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits  # [1, P, V]


def head_row(model) -> torch.Tensor:
    (row,) = [p for n, p in model.named_parameters() if "lm_head.token_adapter.trainable_tokens_delta" in n]
    return row.detach().clone()  # [1, H]


def check_reloads(folder: Path, trained) -> None:
    """The trained adapter reloads with PEFT's own loaders (offline) and with halluc-rl's, to the same logits."""
    policy, tokenizer, _ = load_policy(folder)
    expected = logits_of(trained.eval(), tokenizer)
    auto = AutoPeftModelForCausalLM.from_pretrained(str(folder)).eval()  # opens the recorded base, offline
    plain = PeftModel.from_pretrained(load_model("tiny"), str(folder)).eval()
    for model in (policy, auto, plain):
        assert torch.equal(logits_of(model, tokenizer), expected)
    assert base_model_name(folder) == "tiny"


def test_a_plain_trl_grpo_trainer_trains_a_saved_policy(saved_policy, tmp_path):
    """The README's "Using a policy in your own TRL trainer", step for step: TRL's fused head reads ``lm_head.bias``
    of the wrapped backtrack row, which PEFT's wrapper alone does not have."""
    prompts = Dataset.from_list([{"prompt": format_prompt(p.question, None)} for p in PROBLEMS])

    model, tokenizer, _ = load_policy(saved_policy, trainable=True)  # a PEFT model: LoRA + the backtrack rows
    trainer = GRPOTrainer(model=model, processing_class=tokenizer, reward_funcs=digit_share, train_dataset=prompts,
                          args=GRPOConfig(output_dir=str(tmp_path / "grpo"), num_generations=4,
                                          per_device_train_batch_size=4, max_completion_length=8, max_steps=1,
                                          temperature=3.0, learning_rate=1e-2,
                                          use_cpu=True, bf16=False, report_to="none", save_strategy="no",
                                          disable_tqdm=True, seed=0))
    before = head_row(model)
    trainer.train()
    trainer.save_model(str(tmp_path / "grpo"))
    write_policy_config(model, tmp_path / "grpo")  # the backtrack settings, so halluc-rl reads it back exactly

    assert trainer.state.global_step == 1
    assert not torch.equal(head_row(model), before), "the lm_head backtrack row got no gradient"
    check_reloads(tmp_path / "grpo", model)


def test_a_plain_trl_sft_trainer_trains_a_saved_policy(saved_policy, tmp_path):
    model, tokenizer, _ = load_policy(saved_policy, trainable=True)
    texts = [format_prompt(p.question, tokenizer) + format_solution(p.solution, tokenizer) for p in PROBLEMS]
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=Dataset.from_list(
                             [{"text": t} for t in texts]),
                         args=SFTConfig(output_dir=str(tmp_path / "sft"), per_device_train_batch_size=4, max_steps=1,
                                        learning_rate=1e-2, use_cpu=True, bf16=False, report_to="none",
                                        save_strategy="no", disable_tqdm=True, seed=0))
    before = head_row(model)
    trainer.train()
    trainer.save_model(str(tmp_path / "sft"))
    write_policy_config(model, tmp_path / "sft")
    assert not torch.equal(head_row(model), before)
    check_reloads(tmp_path / "sft", model)


def test_the_head_bias_is_what_the_wrapped_head_computes(saved_policy):
    """``lm_head.bias`` is None on the wrapped bias-free head, and the fused head's product is the model's logits."""
    model, tokenizer, _ = load_policy(saved_policy)
    head = model.get_output_embeddings()
    assert type(head).__name__ == "TrainableTokensWrapper" and head.bias is None
    ids = tokenizer([format_prompt(PROBLEMS[0].question, tokenizer)], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        hidden = model.get_base_model().model(input_ids=ids).last_hidden_state  # [1, P, H]
        fused = torch.nn.functional.linear(hidden, head.weight, head.bias)  # [1, P, V]
        assert torch.equal(fused, model(input_ids=ids).logits)
    expose_head_bias(model)  # idempotent
    assert head.bias is None


def test_adapters_record_a_loadable_base_and_halluc_rl_s_portable_name(saved_policy, tmp_path):
    adapter = json.loads((saved_policy / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(TINY_MODEL_DIR)  # what PEFT's loaders open
    assert json.loads((saved_policy / "config.json").read_text())[BASE_NAME_KEY] == "tiny"
    # another machine: the recorded path does not exist there, and halluc-rl loads the base by its name
    moved = tmp_path / "moved"
    moved.mkdir()
    for file in saved_policy.iterdir():
        (moved / file.name).write_bytes(file.read_bytes())
    (moved / "adapter_config.json").write_text(json.dumps({**adapter, "base_model_name_or_path": "/elsewhere/tiny"}))
    assert base_model_name(moved) == "tiny"
    reference, tokenizer, _ = load_policy(saved_policy)
    assert torch.equal(logits_of(load_policy(moved)[0], tokenizer), logits_of(reference, tokenizer))
    # an adapter saved by plain PEFT (no config.json): the embedded model's folder reads back as its name
    bare = tmp_path / "bare"
    reference.save_pretrained(bare)
    assert base_model_name(bare) == "tiny"
    # an older adapter recording the name only: halluc-rl loads it, and saving it again records the path
    older = tmp_path / "older"
    older.mkdir()
    for file in saved_policy.iterdir():
        (older / file.name).write_bytes(file.read_bytes())
    (older / "adapter_config.json").write_text(json.dumps({**adapter, "base_model_name_or_path": "tiny"}))
    again, _, _ = load_policy(older)
    again.save_pretrained(tmp_path / "again")
    saved = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(TINY_MODEL_DIR)


# -- no deprecation noise ----------------------------------------------------------------------------------------

OURS = tuple(str(ROOT / part) for part in ("halluc_rl", "agents", "envs"))


def deprecations_through_halluc_rl(run) -> list[str]:
    """Every FutureWarning or DeprecationWarning raised while ``run()`` goes through halluc-rl's own code, with the
    last halluc-rl line it came through."""
    found: list[str] = []

    def record(message, category, filename, lineno, file=None, line=None):
        if not issubclass(category, (FutureWarning, DeprecationWarning)):
            return
        ours = [f for f in traceback.extract_stack()[:-1] if f.filename.startswith(OURS)]
        if ours:
            found.append(f"{category.__name__}: {str(message)[:120]} (via {ours[-1].filename}:{ours[-1].lineno})")

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        assert run() == 0
    return found


@pytest.mark.slow
def test_normal_runs_raise_no_deprecation_warning(tmp_path):
    """A short SFT from the shipped config, an eval, a PPO update and a GRPO step (at TRL's defaults) on the
    result: the current transformers APIs (``cache=``, activation checkpointing), nothing deprecated through
    halluc-rl's calls."""
    agents = {name: importlib.import_module(f"halluc_rl.agents.{name}") for name in ("sft", "evaluate", "ppo", "grpo")}
    sft, policy = tmp_path / "sft", str(tmp_path / "sft")
    runs = {
        "sft": lambda: agents["sft"].main([
            "--config", str(CONFIGS / "sft_tiny.yaml"), "--output_dir", str(sft), "--num_train_problems", "16",
            "--max_steps", "2", "--per_device_train_batch_size", "8", "--report_to", "none",
            "--save_strategy", "no", "--disable_tqdm", "true"]),
        "eval": lambda: agents["evaluate"].main([
            "--policy", policy, "--num_problems", "2", "--num_samples", "1", "--max_new_tokens", "12",
            "--output_dir", str(tmp_path / "eval")]),
        "ppo": lambda: agents["ppo"].main([
            "--config", str(CONFIGS / "ppo_tiny.yaml"), "--model_name_or_path", policy, "--output_dir",
            str(tmp_path / "ppo"), "--num_problems", "8", "--updates", "1", "--problems_per_update", "2",
            "--group_size", "2", "--max_new_tokens", "12", "--report_to", "none"]),
        "grpo": lambda: agents["grpo"].main([  # TRL's defaults: activation checkpointing on
            "--model_name_or_path", policy, "--output_dir", str(tmp_path / "grpo"), "--num_train_problems", "8",
            "--max_steps", "1", "--num_generations", "4", "--per_device_train_batch_size", "4",
            "--max_completion_length", "12", "--use_cpu", "true", "--report_to", "none", "--save_strategy", "no",
            "--disable_tqdm", "true"]),
    }
    for name, run in runs.items():
        assert deprecations_through_halluc_rl(run) == [], name


@pytest.mark.parametrize("stage", ["sft", "dpo", "grpo"])
def test_trl_configs_at_their_defaults_raise_no_deprecation_warning(stage, tmp_path):
    """TRL's default ``gradient_checkpointing`` is carried to ``activation_checkpointing`` (the same value)."""
    agent = importlib.import_module(f"halluc_rl.agents.{stage}")
    config_type = getattr(agent, f"{stage.upper()}Config")
    parsed: list = []

    def parse() -> int:
        parsed.extend(parse_config([ModelArgs, config_type], ["--output_dir", str(tmp_path), "--use_cpu", "true"]))
        return 0

    assert deprecations_through_halluc_rl(parse) == []
    config = parsed[-1]
    assert config.activation_checkpointing is True and config.gradient_checkpointing is True  # TRL's default
    with pytest.warns(FutureWarning, match="gradient_checkpointing"):  # a user's own old name is still flagged
        explicit = parse_config([ModelArgs, config_type], ["--output_dir", str(tmp_path), "--use_cpu", "true",
                                                         "--gradient_checkpointing", "false"])[-1]
    assert explicit.activation_checkpointing is False
