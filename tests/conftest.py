"""Shared fixtures: the one tiny-model recipe for tests (a tokenizer trained on the spot, models from configs)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The suite never needs the Hub. huggingface_hub reads these once, when it is first imported, so they are set here,
# before anything below imports it: a test of the offline error path then fails in milliseconds instead of
# spending tens of seconds on connection retries. setdefault: an explicit setting in the shell still wins.
for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_name, "1")

from halluc_rl.modeling import add_backtrack_token  # noqa: E402
from halluc_rl.tiny import build_tiny_model, train_tokenizer  # noqa: E402

FULL = os.environ.get("HALLUC_RL_FULL") == "1"
"""Run the full versions of slow end-to-end tests (CI runs their short versions)."""

GSM8K_DIR = Path(os.environ.get("HALLUC_RL_GSM8K_DIR", Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"))
"""Real GSM8K (MIT, openai/grade-school-math) as jsonl, beside the checkout: ../shared/data/gsm8k/{train,test}.jsonl."""


@pytest.fixture(scope="session")
def gsm8k_dir() -> Path:
    if not (GSM8K_DIR / "test.jsonl").exists():
        pytest.skip(f"GSM8K files not found in {GSM8K_DIR} (set HALLUC_RL_GSM8K_DIR)")
    return GSM8K_DIR


CORPUS = [
    "Tom has 3 apples and buys 4 more. 3 + 4 = 7 apples.\n#### 7",
    "A box holds 12 pens. 5 boxes hold 5 * 12 = 60 pens.\n#### 60",
    "She had 20 dollars and spent 8, so 20 - 8 = 12 dollars are left.\n#### 12",
    "delete remove undo erase back cancel",
    "The answer is 42. Question: How many cats are there?\nAnswer:",
]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and a busy machine makes several threads much slower.

    Modules that run models opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tokenizer():
    """A byte-level BPE tokenizer trained on a few lines, with <|BACKTRACK|> as a special token."""
    return train_tokenizer(CORPUS * 4, vocab_size=320)


def make_model(arch: str, tokenizer, seed: int = 0, **overrides):
    """A tiny model of ``arch`` whose vocabulary matches ``tokenizer``, with the backtrack row set up."""
    overrides.setdefault("hidden_size", 64)
    overrides.setdefault("num_layers", 2)
    model = build_tiny_model(arch, vocab_size=len(tokenizer), seed=seed, **overrides)
    add_backtrack_token(model, tokenizer)
    return model


ARCHS = ["llama", "qwen2", "gpt2"]


@pytest.fixture
def base_dir(tmp_path, tokenizer):
    """A tiny Llama (untied head) saved with its tokenizer: a base model as a user would have one."""
    path = tmp_path / "base"
    make_model("llama", tokenizer, hidden_size=32).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
