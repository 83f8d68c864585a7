"""The one tiny-model recipe: tests, benchmarks and ``halluc-rl pretrain`` all build from here."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from halluc_rl.backtrack import BACKTRACK_TOKEN

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<s>", "</s>", "<unk>", BACKTRACK_TOKEN)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512, special_tokens: Sequence[str] = SPECIAL_TOKENS,
                    split_digits: bool = True):
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it as a ``PreTrainedTokenizerFast``.

    With ``split_digits`` (the default) every digit is its own token, which keeps multi-digit arithmetic learnable
    for a tiny model; without it a digit keeps its leading space (`` 7`` is one token), an option for one-digit
    values (``deps``). On ``deps`` it learned slower than split digits (docs/tasks.md, runs d4 and e1).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if split_digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    extra = [t for t in special_tokens if t not in ("<pad>", "<s>", "</s>", "<unk>")]
    if extra:
        fast.add_special_tokens({"additional_special_tokens": extra}, replace_extra_special_tokens=False)
    fast.padding_side = "left"
    return fast


def tiny_config(arch: str = "llama", vocab_size: int = 512, **overrides):
    """Config of a tiny causal LM. ``arch`` is one of llama, qwen2, gpt2 (about 3M parameters at the defaults)."""
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    hidden, layers, heads = overrides.pop("hidden_size", 192), overrides.pop("num_layers", 4), overrides.pop("heads", 4)
    if arch == "gpt2":
        kw = dict(vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=1024,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
        kw.update(overrides)
        return GPT2Config(**kw)
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}.get(arch)
    if cls is None:
        raise ValueError(f"unknown tiny architecture {arch!r}; use llama, qwen2 or gpt2")
    kw = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
              num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), max_position_embeddings=1024,
              bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=arch == "qwen2")
    kw.update(overrides)
    return cls(**kw)


def build_tiny_model(arch: str = "llama", vocab_size: int = 512, seed: int = 0, **overrides):
    """A randomly initialised tiny causal LM, reproducible from ``seed``, in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab_size, **overrides))
    return model.eval()
