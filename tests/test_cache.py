"""The defining test: after any interleaving of appends and rewinds the logits equal a fresh forward."""

import random
from types import SimpleNamespace

import pytest
import torch
from transformers import DynamicCache, StaticCache

from halluc_rl.backtrack import apply_actions, backtrack_token_id
from halluc_rl.cache import RewindableCache, rewind_cache
from halluc_rl.generation import generate
from halluc_rl.modeling import add_backtrack_token
from halluc_rl.tiny import tiny_config
from tests.conftest import ARCHS, make_model

pytestmark = pytest.mark.usefixtures("one_thread")

WINDOW = 8


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


# -- sliding-window models ------------------------------------------------------------------------------------


def sliding_model(arch, tokenizer, seed=0):
    """A tiny Mistral or Qwen2 (every layer slides) or Gemma-2 (sliding and full layers alternate), window 8."""
    from transformers import AutoModelForCausalLM, Gemma2Config, MistralConfig

    if arch == "qwen2":
        return make_model("qwen2", tokenizer, seed=seed, use_sliding_window=True, sliding_window=WINDOW,
                          layer_types=["sliding_attention", "sliding_attention"])
    kw = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=WINDOW,
              max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config = MistralConfig(**kw) if arch == "mistral" else Gemma2Config(query_pre_attn_scalar=16, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    add_backtrack_token(model, tokenizer)
    return model


def sliding_layers(rc):
    return [layer for layer in rc.cache.layers if layer.is_sliding]


@pytest.mark.parametrize("arch", ["mistral", "gemma2"])
@pytest.mark.parametrize("prompt_lengths", [(4,), (11,), (3, 5, 2), (11, 3, 6)])
def test_sliding_window_rewinds_match_fresh_forward(arch, prompt_lengths, tokenizer):
    """Uniform rewinds (every row alike) past a full window: single ones, bursts of 2-5 back to back, deep ones."""
    model = sliding_model(arch, tokenizer)
    rng = random.Random(f"sliding-{arch}-{prompt_lengths}")
    vocab, batch = len(tokenizer), len(prompt_lengths)
    prompts = [[rng.randrange(5, vocab) for _ in range(n)] for n in prompt_lengths]
    seqs = [list(p) for p in prompts]
    rc = RewindableCache(model)
    assert len(sliding_layers(rc)) == (2 if arch == "mistral" else 1)
    rc.prefill(*left_pad(prompts))
    width = max(map(len, prompts))
    for layer in sliding_layers(rc):  # at most the last window - 1 prompt states are kept
        assert layer.keys.shape[-2] == min(width, WINDOW - 1)

    def append():
        tokens = [rng.randrange(5, vocab) for _ in range(batch)]
        for b in range(batch):
            seqs[b].append(tokens[b])
        logits = rc.step(torch.tensor(tokens))
        for b in range(batch):
            torch.testing.assert_close(logits[b], fresh_logits(model, seqs[b]), atol=1e-4, rtol=0)

    def rewind(n):
        for b in range(batch):
            del seqs[b][len(seqs[b]) - n :]
        rc.rewind(n)

    full_rewinds = 0  # rewinds made while the cache held at least a window

    def burst(sizes):
        nonlocal full_rewinds
        for n in sizes:
            full_rewinds += rc.cache.get_seq_length() >= WINDOW
            rewind(n)
        append()

    if width < WINDOW:  # a backtrack exactly at a full window, then two in a row
        while rc.cache.get_seq_length() < WINDOW:
            append()
        burst([1])
        assert rc.cache.get_seq_length() == WINDOW
        burst([1, 1])
        assert rc.cache.get_seq_length() == WINDOW - 1
        append()
        burst([2])  # a two-token rewind at exactly a window (the generation engine's delete)
    most = 0
    for step in range(200):
        room = len(seqs[0]) - len(prompts[0])
        if room >= 5 and rng.random() < 0.2:
            burst([1] * rng.randint(2, 5))  # back-to-back rewinds
        elif room >= 4 and rng.random() < 0.08:
            burst([rng.randint(2, 4)])  # one deep rewind
        else:
            append()
        most = max(most, rc.cache.get_seq_length())
        if step >= 80 and len(seqs[0]) >= 36:
            break
    burst([len(seqs[0]) - len(prompts[0])])  # back down to the prompt, then past the window again
    for _ in range(WINDOW + 2):
        append()
    assert most >= 36 and full_rewinds >= 15
    assert rc.num_holes == 0 and rc.num_compactions == 0  # rewinds were crops
    response = len(seqs[0]) - len(prompts[0])
    for layer in sliding_layers(rc):  # the record holds more than a window, and no more than the rewinds need
        assert layer.get_seq_length() == width + response
        assert layer.keys.shape[-2] == min(width, WINDOW - 1) + response > WINDOW


def test_rewind_cache_refuses_a_sliding_layer_without_its_past(tokenizer):
    model = sliding_model("mistral", tokenizer)
    cache = DynamicCache(config=model.config)  # not recording: each layer keeps window - 1 states
    model(input_ids=torch.arange(5, 15).unsqueeze(0), past_key_values=cache, use_cache=True)
    with pytest.raises(RuntimeError, match="activate_past_recording"):
        rewind_cache(cache, 1)
    assert cache.get_seq_length() == 10  # refused before touching any layer
    recording = DynamicCache(config=model.config)
    recording.activate_past_recording()
    model(input_ids=torch.arange(5, 15).unsqueeze(0), past_key_values=recording, use_cache=True)
    for _ in range(3):  # back to back: transformers' own crop would keep window - 1 states after the first
        rewind_cache(recording, 1)
    ids = list(range(5, 12))
    out = model(input_ids=torch.tensor([[12]]), past_key_values=recording, use_cache=True,
                position_ids=torch.tensor([[7]]))
    torch.testing.assert_close(out.logits[0, -1], fresh_logits(model, ids + [12]), atol=1e-4, rtol=0)


@pytest.mark.parametrize("batch", [1, 3])
def test_generate_logprobs_on_a_sliding_window_model(batch, tokenizer):
    """Backtrack-aware generation on Mistral: each action's log-prob equals a fresh forward's (with 3 rows, each
    backtracks on its own and the second one stops early)."""
    model = sliding_model("mistral", tokenizer, seed=1)
    bt, eos = backtrack_token_id(tokenizer), tokenizer.eos_token_id
    rng = random.Random(f"generate-{batch}")
    forced = []
    for _ in range(batch):
        row = []
        while len(row) < 80:  # runs of model-chosen tokens, then bursts of 1-5 backtracks
            row += [-1] * rng.randint(6, 10) + [bt] * rng.randint(1, 5)
        forced.append(row[:80])
    if batch > 1:
        forced[1][60] = eos
    g = torch.Generator().manual_seed(0)
    out = generate(model, tokenizer, ["Tom has 3 apples", "3 + 4 =", "A box"][:batch], max_new_tokens=80,
                   do_sample=True, forced_actions=torch.tensor(forced), generator=g, return_logprobs=True,
                   eos_token_id=[eos], loop_guard=None, allow_failed_backtracks=True)
    assert out.finished.tolist() == [False, True, False][:batch]
    for b in range(batch):
        actions = [a for a in out.actions[b].tolist() if a >= 0]
        assert int(out.num_deleted[b]) >= 15
        longest = 0
        for s, a in enumerate(actions):
            ids = out.prompt_ids[b] + apply_actions(actions[:s], bt).visible_ids
            longest = max(longest, len(ids))
            expected = torch.log_softmax(fresh_logits(model, ids).float(), -1)[a]
            torch.testing.assert_close(out.logprobs[b, s], expected, atol=1e-4, rtol=0)
        assert longest > 3 * WINDOW


@pytest.mark.parametrize("arch", ["mistral", "gemma2", "qwen2"])
def test_sliding_window_rows_rewound_differently_match_fresh_forward(arch, tokenizer):
    """Per-row rewinds and masked writes leave holes; a row is compacted before it reads through one."""
    model = sliding_model(arch, tokenizer, seed=2)
    rng = random.Random(f"rows-{arch}")
    vocab = len(tokenizer)
    prompts = [[rng.randrange(5, vocab) for _ in range(n)] for n in (3, 11, 6)]
    seqs = [list(p) for p in prompts]
    rc = RewindableCache(model, compact_min_holes=10**6)  # only the sliding-window rule compacts
    assert sliding_layers(rc)
    rc.prefill(*left_pad(prompts))
    uneven = 0  # rewinds that left rows apart while the window was full
    for step in range(300):
        for _ in range(rng.choice([1, 1, 2])):  # sometimes two rewinds back to back
            counts = []
            for b in range(3):
                room = len(seqs[b]) - len(prompts[b])
                n = rng.randint(1, min(4, room)) if room and rng.random() < 0.2 else 0
                del seqs[b][len(seqs[b]) - n :]
                counts.append(n)
            uneven += len(set(counts)) > 1 and rc.cache.get_seq_length() > WINDOW
            rc.rewind(torch.tensor(counts))
        write = [rng.random() < 0.85 for _ in range(3)]
        tokens = [rng.randrange(5, vocab) for _ in range(3)]
        logits = rc.step(torch.tensor(tokens), torch.tensor(write))
        for b in range(3):
            if write[b]:
                seqs[b].append(tokens[b])
                torch.testing.assert_close(logits[b], fresh_logits(model, seqs[b]), atol=1e-4, rtol=0)
        if step >= 80 and min(map(len, seqs)) >= 4 * WINDOW:
            break
    assert uneven >= 10
    assert 0 < rc.num_compactions < step  # compacted when a written row had a hole, not at every step


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_follow_matches_fresh_forward(arch, tokenizer):
    """``follow`` (the path of generation and the reward scorers) after appends, per-row deletions, an emptied
    response and a row gone inactive: each active row's logits equal a fresh forward over prompt + response."""
    model = make_model(arch, tokenizer) if arch == "llama" else sliding_model(arch, tokenizer, seed=3)
    rng = random.Random(f"follow-{arch}")
    vocab = len(tokenizer)
    prompts = [[rng.randrange(5, vocab) for _ in range(n)] for n in (4, 9, 2)]
    responses = [[], [], []]
    rc = RewindableCache(model, compact_min_holes=4)
    rc.prefill(*left_pad(prompts))
    active = [True, True, True]
    emptied = uneven = 0
    for step in range(80):
        deletes = []
        for b in range(3):
            if not active[b]:
                deletes.append(0)
                continue
            if b == 1 and 15 <= step < 15 + 12:  # row 1 deletes its whole response, then fails a few deletes
                delete = True
            else:
                delete = bool(responses[b]) and rng.random() < 0.2
            if delete:
                del responses[b][-1:]
            else:
                responses[b].append(rng.randrange(5, vocab))
            deletes.append(int(delete))
        if step == 60:
            active[2] = False  # row 2 is done: it is never fed again
        lengths = torch.tensor([len(r) for r in responses])
        last = torch.tensor([r[-1] if r else 0 for r in responses])
        logits = rc.follow(lengths, last, torch.tensor(active))
        emptied += not responses[1] and len(responses[0]) > 0 and active[0]
        uneven += len(set(deletes)) > 1
        for b in range(3):
            if active[b]:
                torch.testing.assert_close(logits[b], fresh_logits(model, prompts[b] + responses[b]), atol=1e-4,
                                           rtol=0)
    assert emptied >= 2 and uneven >= 10 and rc.num_compactions > 0
    assert min(len(prompts[b]) + len(responses[b]) for b in range(2)) > 3 * WINDOW
