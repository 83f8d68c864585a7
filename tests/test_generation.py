import pytest
import torch

from halluc_rl.backtrack import ActionKind, EpisodeEnd, apply_actions, backtrack_token_id
from halluc_rl.cache import RewindableCache
from halluc_rl.engine import DECODERS, DecodeEngine, RewindDecoding, decoding_semantics
from halluc_rl.generation import BacktrackGenerationConfig, generate
from tests.conftest import ARCHS, make_model

PROMPTS = ["Tom has 3 apples", "3 + 4 =", "A box"]


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_without_backtracks_equals_generate(arch, tokenizer):
    model = make_model(arch, tokenizer)
    bt = backtrack_token_id(tokenizer)
    out = generate(model, tokenizer, PROMPTS, max_new_tokens=24, backtrack_budget=0, eos_token_id=[])
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    ref = model.generate(**enc, max_new_tokens=24, do_sample=False, suppress_tokens=[bt],
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
    for b in range(len(PROMPTS)):
        assert out.sequences[b] == ref[b, enc.input_ids.shape[1]:].tolist()
    assert int(out.num_backtracks.sum()) == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_logprobs_under_backtracks_equal_fresh_forward(arch, tokenizer):
    """Each action's log-prob equals a fresh forward over prompt + visible prefix at that moment."""
    model = make_model(arch, tokenizer, seed=1)
    bt = backtrack_token_id(tokenizer)
    g = torch.Generator().manual_seed(0)
    forced = torch.where(torch.rand(3, 40, generator=g) < 0.3, bt, -1)  # rows backtrack differently
    out = generate(model, tokenizer, PROMPTS, max_new_tokens=40, do_sample=True, forced_actions=forced,
                   generator=g, return_logprobs=True, eos_token_id=[], compact_min_holes=4, loop_guard=None,
                   allow_failed_backtracks=True)
    assert int(out.num_deleted.sum()) > 10
    for b in range(len(PROMPTS)):
        actions = out.actions[b].tolist()
        for s, a in enumerate(actions):
            visible = apply_actions(actions[:s], bt).visible_ids
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([out.prompt_ids[b] + visible])).logits[0, -1]
            expected = torch.log_softmax(logits.float(), -1)[a]
            torch.testing.assert_close(out.logprobs[b, s], expected, atol=1e-4, rtol=0)
        assert out.sequences[b] == apply_actions(actions, bt).visible_ids


def test_trace_records_every_action(tokenizer):
    model = make_model("llama", tokenizer)
    bt = backtrack_token_id(tokenizer)
    forced = torch.tensor([[bt, 7, 8, bt, 9, -1]])
    out = generate(model, tokenizer, ["A box"], max_new_tokens=5, forced_actions=forced, eos_token_id=[])
    kinds = [e.kind for e in out.trace(0)]
    assert kinds == [ActionKind.FAILED, ActionKind.APPEND, ActionKind.APPEND, ActionKind.DELETE, ActionKind.APPEND]
    assert out.trace(0)[3].deleted == 8 and out.trace(0)[3].position == 1
    assert out.sequences[0] == [7, 9]
    assert (int(out.num_backtracks[0]), int(out.num_deleted[0]), int(out.num_failed[0])) == (2, 1, 1)


def test_budget_and_bias(tokenizer):
    model = make_model("llama", tokenizer)
    # a huge bias makes the model backtrack at every step; the budget caps it
    out = generate(model, tokenizer, PROMPTS, max_new_tokens=12, backtrack_bias=1e4, backtrack_budget=3)
    assert out.num_backtracks.tolist() == [3, 3, 3]
    never = generate(model, tokenizer, PROMPTS, max_new_tokens=12, backtrack_bias=float("-inf"))
    assert int(never.num_backtracks.sum()) == 0


def test_budget_zero_means_no_backtracks_at_all(tokenizer):
    """``backtrack_budget=0`` is a budget of zero, not "unlimited" (that is None)."""
    model = make_model("llama", tokenizer)
    kw = dict(max_new_tokens=8, backtrack_bias=1e4, eos_token_id=[])
    unlimited = generate(model, tokenizer, PROMPTS, backtrack_budget=None, **kw)
    assert unlimited.num_backtracks.tolist() == [4, 4, 4]  # type, delete, type, delete...: the bias wins
    zero = generate(model, tokenizer, PROMPTS, backtrack_budget=0, **kw)
    assert zero.num_backtracks.tolist() == [0, 0, 0] and zero.kinds.eq(int(ActionKind.APPEND)).all()
    assert [len(s) for s in zero.sequences] == [8, 8, 8]


def test_loop_guard_bans_a_token_typed_and_deleted_too_often(tokenizer):
    """Type the greedy choice t, delete it, twice; at the next free greedy step t is still the argmax. Without the
    guard (or with a limit not yet reached) the model types t a third time; with ``loop_guard=2`` it cannot, and
    takes the runner-up instead."""
    model = make_model("llama", tokenizer)
    bt = backtrack_token_id(tokenizer)
    prompt = tokenizer("A box")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt])).logits[0, -1]
    logits[bt] = float("-inf")  # a backtrack on the empty response is masked
    first, runner_up = logits.topk(2).indices.tolist()
    forced = torch.tensor([[first, bt, first, bt, -1]])  # step 4 is free; the budget of 2 masks the backtrack there

    def free_step(loop_guard: int | None) -> int:
        out = generate(model, tokenizer, [prompt], max_new_tokens=5, forced_actions=forced, loop_guard=loop_guard,
                       backtrack_budget=2, eos_token_id=[])
        assert out.kinds[0, :4].tolist() == [int(ActionKind.APPEND), int(ActionKind.DELETE)] * 2
        return int(out.actions[0, 4])

    assert free_step(None) == first  # what the guard must prevent: the same token again, at the same place
    assert free_step(3) == first  # two deletions are under a limit of three
    assert free_step(2) == runner_up
    assert free_step(1) == runner_up


def test_stops_on_eos_and_stop_strings(tokenizer):
    model = make_model("llama", tokenizer)
    eos = tokenizer.eos_token_id
    forced = torch.tensor([[7, eos, 8, 9], [7, 8, 9, 10]])
    out = generate(model, tokenizer, PROMPTS[:2], max_new_tokens=4, forced_actions=forced)
    assert out.sequences[0] == [7, eos] and out.finished.tolist() == [True, False]
    assert out.kinds[0, 2:].tolist() == [-1, -1]
    ids = tokenizer("= 7 apples", add_special_tokens=False)["input_ids"]
    forced = torch.tensor([ids + [5] * 4])
    out = generate(model, tokenizer, ["x"], max_new_tokens=len(ids) + 4, forced_actions=forced,
                   stop_strings=("apples",))
    assert out.texts[0].endswith("apples") and bool(out.finished[0])


def test_sampling_is_reproducible_with_a_generator(tokenizer):
    model = make_model("llama", tokenizer)
    cfg = BacktrackGenerationConfig(max_new_tokens=16, do_sample=True, top_k=20, top_p=0.9, temperature=0.8)
    a = generate(model, tokenizer, PROMPTS, cfg, generator=torch.Generator().manual_seed(3))
    b = generate(model, tokenizer, PROMPTS, cfg, generator=torch.Generator().manual_seed(3))
    assert a.sequences == b.sequences


def test_bad_input(tokenizer):
    model = make_model("llama", tokenizer)
    with pytest.raises(TypeError, match="unknown generation option"):
        generate(model, tokenizer, PROMPTS, max_tokens=3)
    with pytest.raises(ValueError, match="add_backtrack_token"):
        generate(model, tokenizer, PROMPTS, backtrack_id=10_000)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, tokenizer, PROMPTS, do_sample=True, temperature=0)


def test_prompt_logits_are_not_edited_in_place(tokenizer):
    """Rows with an empty response reuse the prompt's logits; a bias must be applied to them once, not per step."""
    model = make_model("llama", tokenizer)
    bt = backtrack_token_id(tokenizer)
    forced = torch.tensor([[bt, bt, bt, 7]])
    out = generate(model, tokenizer, ["A box"], max_new_tokens=4, forced_actions=forced, backtrack_bias=-3.0,
                   return_logprobs=True, eos_token_id=[], allow_failed_backtracks=True)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([out.prompt_ids[0]])).logits[0, -1].clone()
    logits[bt] -= 3.0
    expected = torch.log_softmax(logits, -1)
    torch.testing.assert_close(out.logprobs[0], expected[[bt, bt, bt, 7]], atol=1e-5, rtol=0)


def test_backtracks_on_an_empty_response_are_masked_unless_allowed(tokenizer):
    """A failed backtrack is a no-op (same text, same logits): a decoder that chose one would loop."""
    model = make_model("llama", tokenizer)
    bt = backtrack_token_id(tokenizer)
    out = generate(model, tokenizer, PROMPTS, max_new_tokens=6, backtrack_bias=1e4, return_logprobs=True,
                   eos_token_id=[])
    assert int(out.num_failed.sum()) == 0  # the bias wants backtracks; none is taken on an empty response
    assert out.kinds[:, 0].tolist() == [int(ActionKind.APPEND)] * 3 and out.kinds[:, 1].eq(int(ActionKind.DELETE)).all()
    allowed = generate(model, tokenizer, PROMPTS, max_new_tokens=6, backtrack_bias=1e4, eos_token_id=[],
                       allow_failed_backtracks=True)
    assert int(allowed.num_failed.sum()) == 18
    forced = generate(model, tokenizer, PROMPTS[:1], max_new_tokens=2, forced_actions=torch.tensor([[bt, 7]]),
                      return_logprobs=True, eos_token_id=[])
    assert int(forced.num_failed[0]) == 1 and forced.logprobs[0, 0] == float("-inf")


class _CountingRewind(RewindDecoding):
    """The rewind semantics, counting how each step fed the cache: a plain step, or a rewind (``follow``)."""

    name = "counting"

    def __init__(self, cache, pad):
        super().__init__(cache, pad)
        self.plain_steps = self.rewinds = 0
        cache_step, cache_follow = cache.step, cache.follow

        def step(*args):
            self.plain_steps += len(args) == 1  # follow() calls step(tokens, write) itself
            return cache_step(*args)

        def follow(*args):
            self.rewinds += 1
            return cache_follow(*args)

        cache.step, cache.follow = step, follow


def test_engine_semantics_are_chosen_by_name(tokenizer, monkeypatch):
    """A semantics is a part chosen by name; ``rewind`` takes the plain cached step exactly when every row appended
    and none has finished, and rewinds (``follow``) otherwise. Stepping the engine by hand gives ``generate``'s
    output."""
    model = make_model("llama", tokenizer, seed=1)
    bt, eos = backtrack_token_id(tokenizer), tokenizer.eos_token_id
    with pytest.raises(ValueError, match=r"semantics: unknown value 'undo'; use one of retry, rewind"):
        decoding_semantics("undo", RewindableCache(model), 0)
    forced = torch.full((3, 12), -1)
    forced[0, 3], forced[1, 5], forced[2, 8] = bt, bt, eos  # a backtrack in two rows, one row stops
    kw = dict(max_new_tokens=12, forced_actions=forced, eos_token_id=eos, backtrack_bias=float("-inf"))
    ref = generate(model, tokenizer, PROMPTS, **kw)
    monkeypatch.setitem(DECODERS, "counting", _CountingRewind)
    config = BacktrackGenerationConfig(**{k: v for k, v in kw.items() if k != "forced_actions"})
    engine = DecodeEngine(model, tokenizer, config, backtrack_id=bt, head="softmax", pad=tokenizer.pad_token_id,
                          end=EpisodeEnd([eos], (), 12), forced_actions=forced, semantics="counting")
    ids = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    engine.start(ids.input_ids, ids.attention_mask)
    steps = 0
    while engine.step():
        steps += 1
    out = engine.output()
    assert out.sequences == ref.sequences and torch.equal(out.kinds, ref.kinds) and torch.equal(out.finished,
                                                                                                ref.finished)
    assert ref.kinds.shape[1] == 12 and steps == 11  # the last step feeds nothing
    assert (engine.semantics.plain_steps, engine.semantics.rewinds) == (6, 5)  # steps 0-2, 4, 6, 7 fast; 3, 5, 8-10 follow


def test_retry_feeds_every_action_and_never_crops(tokenizer, monkeypatch):
    """retry: the same actions give the same visible texts as rewind, but every step is a plain cached decode of
    the action itself (a backtrack too); nothing is rewound or compacted, and the context is prompt + actions."""
    model = make_model("llama", tokenizer, seed=1)
    bt, eos = backtrack_token_id(tokenizer), tokenizer.eos_token_id
    g = torch.Generator().manual_seed(0)
    forced = torch.where(torch.rand(3, 16, generator=g) < 0.3, bt, torch.randint(10, 60, (3, 16), generator=g))
    forced[2, 9] = eos
    kw = dict(max_new_tokens=16, forced_actions=forced, eos_token_id=eos, compact_min_holes=1)
    rewind = generate(model, tokenizer, PROMPTS, **kw)
    fed, rewinds = [], []
    monkeypatch.setattr(RewindableCache, "rewind", lambda self, n: rewinds.append(n))
    original = RewindableCache.step
    monkeypatch.setattr(RewindableCache, "step", lambda self, t, w=None: fed.append(t.clone()) or original(self, t, w))
    retry = generate(model, tokenizer, PROMPTS, semantics="retry", **kw)
    assert retry.texts == rewind.texts and torch.equal(retry.kinds, rewind.kinds) and retry.semantics == "retry"
    assert not rewinds and len(fed) == 15  # one plain step per action but the last
    steps = torch.stack(fed, 1)  # [B, 15] what was fed: the actions, pad once a row is done
    live = retry.action_mask[:, :15]
    assert torch.equal(steps[live], retry.actions[:, :15][live]) and bool((steps[live] == bt).any())


def test_retry_branches_from_an_action_stream(tokenizer):
    """retry with a prefilled response: the prefix is the action stream so far (a backtrack in it), forked into 3
    branches; each continuation's log-probs equal the scorer's on the whole stream."""
    from halluc_rl.scoring import score_actions

    model = make_model("llama", tokenizer, seed=2)
    bt = backtrack_token_id(tokenizer)
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS[:2]]
    prefixes = [[11, 12, bt, 13], [21, bt, bt, 22, 23]]
    out = generate(model, tokenizer, prompts, responses=prefixes, num_branches=3, semantics="retry", do_sample=True,
                   max_new_tokens=8, return_logprobs=True, eos_token_id=[], loop_guard=None,
                   generator=torch.Generator().manual_seed(1))
    assert len(out.sequences) == 6 and out.sequences[0][:2] == [11, 13] and out.sequences[3][:2] == [22, 23]
    assert len({tuple(s) for s in out.sequences[:3]}) > 1  # the branches differ
    rows = [b // 3 for b in range(6)]
    streams = torch.tensor([[*prefixes[r], *out.actions[b].tolist()] + [-1] * (5 - len(prefixes[r]))
                            for b, r in enumerate(rows)])  # [6, 13]: -1 pads the shorter prefix's rows
    config = BacktrackGenerationConfig(do_sample=True, loop_guard=None)
    scores = score_actions(model, [prompts[r] for r in rows], streams, config, semantics="retry")
    for b, r in enumerate(rows):
        n = len(prefixes[r])
        torch.testing.assert_close(scores.logprobs[b, n : n + 8], out.logprobs[b], atol=1e-5, rtol=0)


def test_retry_refuses_a_context_longer_than_the_models_positions(tokenizer):
    model = make_model("llama", tokenizer, seed=1)
    model.config.max_position_embeddings = 24
    with pytest.raises(ValueError, match=r"retry context of \d+ prompt tokens \+ 20 actions exceeds the model's 24"):
        generate(model, tokenizer, PROMPTS, max_new_tokens=20, semantics="retry")
    generate(model, tokenizer, PROMPTS, max_new_tokens=20)  # rewind keeps only the visible text: allowed
