"""The defining test: after any interleaving of appends and rewinds the logits equal a fresh forward."""

import random
from types import SimpleNamespace

import pytest
import torch
from transformers import DynamicCache, StaticCache

from halluc_rl.cache import RewindableCache, rewind_cache
from halluc_rl.modeling import tiny_config
from tests.conftest import ARCHS, make_model


def fresh_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, -1]


def left_pad(prompts, pad=0):
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("batch", [1, 4])
def test_rewind_interleavings_match_fresh_forward(arch, batch, tokenizer):
    model = make_model(arch, tokenizer)
    rng = random.Random(f"{arch}-{batch}")
    vocab = len(tokenizer)
    prompts = [[rng.randrange(5, vocab) for _ in range(rng.randint(2, 7))] for _ in range(batch)]
    seqs = [list(p) for p in prompts]
    rc = RewindableCache(model, compact_min_holes=3)
    logits = rc.prefill(*left_pad(prompts))
    for b in range(batch):
        torch.testing.assert_close(logits[b], fresh_logits(model, seqs[b]), atol=1e-4, rtol=0)
    for _ in range(40):
        counts = []
        for b in range(batch):
            room = len(seqs[b]) - len(prompts[b])
            n = rng.randint(1, min(3, room)) if room and rng.random() < 0.35 else 0
            del seqs[b][len(seqs[b]) - n :]
            counts.append(n)
        rc.rewind(torch.tensor(counts))
        tokens = [rng.randrange(5, vocab) for _ in range(batch)]
        for b in range(batch):
            seqs[b].append(tokens[b])
        logits = rc.step(torch.tensor(tokens))
        for b in range(batch):
            torch.testing.assert_close(logits[b], fresh_logits(model, seqs[b]), atol=1e-4, rtol=0)
    if batch == 1:  # a single row never keeps holes: rewinds are true crops
        assert rc.cache.get_seq_length() == len(seqs[0]) == rc.mask.shape[1]
    else:
        assert rc.num_compactions > 0  # the gather path was exercised


def test_uniform_rewind_crops_the_cache(tokenizer):
    model = make_model("llama", tokenizer)
    rc = RewindableCache(model)
    rc.prefill(*left_pad([[5, 6, 7], [8, 9, 10]]))
    for t in (11, 12, 13):
        rc.step(torch.tensor([t, t]))
    assert rc.cache.get_seq_length() == 6
    rc.rewind(2)
    assert rc.cache.get_seq_length() == 4 and rc.num_holes == 0


def test_rewind_errors(tokenizer):
    model = make_model("llama", tokenizer)
    rc = RewindableCache(model)
    rc.prefill(*left_pad([[5, 6, 7]]))
    rc.step(torch.tensor([8]))
    with pytest.raises(ValueError, match="negative"):
        rc.rewind(-1)
    with pytest.raises(ValueError, match="into the prompt"):
        rc.rewind(2)
    with pytest.raises(ValueError, match="shape"):
        rc.rewind(torch.tensor([1, 1]))
    cache = DynamicCache(config=model.config)
    model(input_ids=torch.tensor([[5, 6]]), past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match="holds only 2"):
        rewind_cache(cache, 3)
    with pytest.raises(ValueError, match="negative"):
        rewind_cache(cache, -1)
    with pytest.raises(ValueError, match="left-padded"):
        RewindableCache(model).prefill(torch.tensor([[5, 0]]), torch.tensor([[1, 0]]))


def test_static_cache_is_refused(tokenizer):
    model = make_model("llama", tokenizer)
    static = StaticCache(config=model.config, max_cache_len=16)
    with pytest.raises(TypeError, match="StaticCache"):
        RewindableCache(model, cache=static)
    with pytest.raises(TypeError, match="StaticCache"):
        rewind_cache(static, 1)


class NoCacheModel(torch.nn.Module):
    """A causal LM stand-in that returns logits but no cache."""

    def __init__(self):
        super().__init__()
        self.config = tiny_config("llama", vocab_size=10, hidden_size=16, num_layers=1)
        self.emb = torch.nn.Embedding(10, 10)

    def forward(self, input_ids, **_):
        return SimpleNamespace(logits=self.emb(input_ids), past_key_values=None)


def test_model_without_cache_is_refused():
    with pytest.raises(TypeError, match="no KV cache"):
        RewindableCache(NoCacheModel()).prefill(torch.tensor([[1, 2]]), torch.tensor([[1, 1]]))


def test_sliding_window_rows_rewound_differently_are_refused(tokenizer):
    model = make_model("qwen2", tokenizer, use_sliding_window=True, sliding_window=64,
                       layer_types=["sliding_attention", "sliding_attention"])
    rc = RewindableCache(model)
    assert rc.sliding
    rc.prefill(*left_pad([[5, 6, 7], [8, 9, 10]]))
    for t in (11, 12):
        rc.step(torch.tensor([t, t]))
    rc.rewind(1)  # alike: a crop, fine
    with pytest.raises(NotImplementedError, match="sliding-window"):
        rc.rewind(torch.tensor([1, 0]))
