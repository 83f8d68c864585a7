"""The one scorer of action streams: exact against the rollout's sampling log-probs, against fresh forwards, and one
packing with the collator. Also the one home of a policy's backtrack settings and of the end of an episode."""

import gymnasium as gym
import pytest
import torch
from transformers import GenerationConfig

import halluc_rl  # noqa: F401  (registers the envs)
from halluc_rl.adapters import make_lora_model
from halluc_rl.args import LoraArgs
from halluc_rl.backtrack import backtrack_token_id
from halluc_rl.data.arithmetic import ArithmeticTask
from halluc_rl.data.collator import MaskedErrorCollator
from halluc_rl.generation import (
    BacktrackGenerationConfig,
    decoding_log_probs,
    decoding_scores,
    generate,
    mask_scores,
)
from halluc_rl.policy import policy_backtrack, set_policy_backtrack
from halluc_rl.rewards import RewardMixer, RuleGrader
from halluc_rl.rollout import rollout
from halluc_rl.scoring import decode_context, pack_streams, score_actions, score_rollout
from tests.conftest import ARCHS, make_model

pytestmark = pytest.mark.usefixtures("one_thread")
PROBLEMS = ArithmeticTask(seed=0).problems("test", 4)


def lora_policy(arch, tokenizer, head="factorized", seed=0):
    """A tiny LoRA policy whose adapter is not a no-op (B matrices randomised), with ``head`` on its config."""
    model = make_model(arch, tokenizer, seed=seed)
    set_policy_backtrack(model, backtrack_token_id(tokenizer), head)
    targets = ["c_attn", "c_proj"] if arch == "gpt2" else ["q_proj", "v_proj", "up_proj"]
    model = make_lora_model(model, LoraArgs(lora_r=4, lora_target_modules=targets), backtrack_token_id(tokenizer))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model.eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_scorer_equals_the_rollouts_sampling_log_probs(tokenizer, arch):
    """Sampled with temperature, bias, budget, loop guard and the factorised head, under LoRA: equal to 1e-5."""
    model = lora_policy(arch, tokenizer)
    g = torch.Generator().manual_seed(3)
    options = dict(do_sample=True, temperature=0.7, backtrack_bias=2.5, backtrack_budget=5, loop_guard=1,
                   max_new_tokens=28)
    ro = rollout(model, tokenizer, PROBLEMS, RewardMixer([RuleGrader()]), generator=g, **options)
    scores = score_rollout(model, ro)
    mask = ro.action_mask
    torch.testing.assert_close(scores.logprobs[mask], ro.logprobs[mask], atol=1e-5, rtol=0)
    ratio = (scores.logprobs - ro.logprobs)[mask].exp()
    torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-5, rtol=0)  # the first PPO ratio
    # the paths under test ran: deletions, a spent budget, loop-guard bans, rows of different lengths
    context = decode_context(ro.actions, backtrack_token_id(tokenizer), ro.generation.config)
    assert int(ro.generation.num_deleted.sum()) >= 4 and context.bans[0].numel() > 0
    assert int(ro.generation.num_backtracks.max()) == 5
    assert torch.isfinite(scores.entropy[mask]).all() and (scores.entropy[mask] > 0).all()
    assert ro.generation.backtrack_head == "factorized"


def test_bursts_failed_backtracks_and_uneven_rows(tokenizer):
    """Forced streams with bursts of backtracks, failed ones (allowed here) and rows of very different lengths."""
    model = lora_policy("llama", tokenizer, head="softmax")
    bt, eos = backtrack_token_id(tokenizer), tokenizer.eos_token_id
    forced = torch.full((3, 30), -1)
    forced[0, :12] = torch.tensor([bt, 7, bt, bt, bt, 8, 9, 10, bt, bt, bt, 11])  # failed, burst into emptiness
    forced[1, :3] = torch.tensor([7, 8, eos])  # stops after 3 actions
    forced[2, 5:10] = bt  # a burst of five after free choices
    out = generate(model, tokenizer, [p.question for p in PROBLEMS[:3]], max_new_tokens=30, do_sample=True,
                   forced_actions=forced, allow_failed_backtracks=True, return_logprobs=True, loop_guard=None,
                   generator=torch.Generator().manual_seed(0))
    assert int(out.num_failed[0]) == 3 and out.action_mask[1].sum() == 3 and out.action_mask[2].sum() == 30
    scores = score_actions(model, out.prompt_ids, out.actions, out.config)
    mask = out.action_mask
    torch.testing.assert_close(scores.logprobs[mask], out.logprobs[mask], atol=1e-5, rtol=0)
    assert (scores.logprobs[~mask] == 0).all() and (scores.entropy[~mask] == 0).all()


def test_each_action_is_scored_on_a_fresh_forward_of_its_visible_state(tokenizer):
    """Independent of generation: the logits at each action's state equal a fresh forward over prompt + visible text
    (the deleted token is never attended to), and the hidden states are that forward's last hidden state."""
    model = lora_policy("qwen2", tokenizer)
    bt = backtrack_token_id(tokenizer)
    prompt = tokenizer("Question: Tom has 3 apples.\nAnswer:")["input_ids"]
    actions = torch.tensor([[7, 8, bt, 9, bt, bt, 10, 11]])
    config = BacktrackGenerationConfig(do_sample=True, temperature=1.3, backtrack_bias=-0.5)
    scores = score_actions(model, [prompt], actions, config, return_hidden=True)
    visible: list[int] = []
    for s, a in enumerate(actions[0].tolist()):
        with torch.no_grad():
            out = model(input_ids=torch.tensor([prompt + visible]), output_hidden_states=True)
        raw = decoding_scores(out.logits[0, -1], bt, "factorized")
        lengths, spent = torch.tensor(len(visible)), torch.tensor(int((actions[0, :s] == bt).sum()))
        expected = decoding_log_probs(mask_scores(raw, bt, config, lengths, spent), config)[a]
        torch.testing.assert_close(scores.logprobs[0, s], expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(scores.hidden[0, s], out.hidden_states[-1][0, -1], atol=1e-4, rtol=1e-4)
        visible = visible[:-1] if a == bt else visible + [a]


def test_scorer_gradients_reach_lora_and_the_backtrack_rows(tokenizer):
    model = lora_policy("llama", tokenizer)
    model.train()
    bt = backtrack_token_id(tokenizer)
    prompt = tokenizer("Question: A box\nAnswer:")["input_ids"]
    scores = score_actions(model, [prompt, prompt[:4]], torch.tensor([[7, bt, 8, 9], [10, 11, -1, -1]]))
    (scores.logprobs.sum() + scores.entropy.sum()).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "lora_" in n)
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "trainable_tokens" in n and "lm_head" in n)


def test_pack_streams_exact_tensors():
    """prompt 10 11 | 20 30 BT 31 BT BT 40: the collator's layout, and every action's state."""
    bt = 4
    packed = pack_streams([[10, 11, 20, 30, bt, 31, bt, bt, 40]], [2], bt)
    assert packed.input_ids.tolist() == [[10, 11, 20, 30, 31, 40]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 3, 2]]
    # states: 20 from 11; 30 from 20; BT from 30; 31 from 20; BT from 31; BT from 20; 40 from 11
    assert packed.predictors.tolist() == [[1, 2, 3, 2, 4, 2, 1]]
    mask = packed.attention_mask[0, 0].int().tolist()
    assert mask[5] == [1, 1, 0, 0, 0, 1]  # 40 (typed after three deletions) sees the prompt only
    assert mask[4] == [1, 1, 1, 0, 1, 0]  # 31 does not see the deleted 30
    # the collator is this function with labels: one home for the layout
    feature = {"input_ids": [10, 11, 20, 30, bt, 31, bt, bt, 40],
               "spans": [("prompt", 0, 2), ("correct", 2, 3), ("error", 3, 4), ("backtrack", 4, 5),
                         ("error", 5, 6), ("backtrack", 6, 8), ("correction", 8, 9)]}
    batch = MaskedErrorCollator(pad_token_id=0, backtrack_token_id=bt, mask_dtype=torch.bool)([feature])
    assert torch.equal(batch["input_ids"], packed.input_ids) and torch.equal(batch["attention_mask"],
                                                                               packed.attention_mask)
    with pytest.raises(ValueError, match="backtrack_token_id"):
        MaskedErrorCollator(pad_token_id=0)([feature])


def test_decode_context_replays_the_decoder():
    bt = 4
    actions = torch.tensor([[7, bt, 7, bt, 8, -1], [bt, 9, 9, bt, bt, bt]])
    config = BacktrackGenerationConfig(loop_guard=2)
    ctx = decode_context(actions, bt, config)
    assert ctx.lengths.tolist() == [[0, 1, 0, 1, 0, 1], [0, 0, 1, 2, 1, 0]]
    assert ctx.num_backtracks.tolist() == [[0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 3]]
    # 7 was deleted twice at position 0 of row 0: banned there from step 4 on
    assert list(zip(*(t.tolist() for t in ctx.bans))) == [(0, 4, 7)]
    assert ctx.mask.tolist() == [[True] * 5 + [False], [True] * 6]


def test_the_head_lives_on_the_config_and_is_read_in_the_same_process(tokenizer):
    """Setting the head on a fresh policy changes what generation samples from, without saving and reloading."""
    model = make_model("llama", tokenizer)
    assert policy_backtrack(model) == (backtrack_token_id(tokenizer), "softmax")
    forced = torch.tensor([[7, 8]])
    soft = generate(model, tokenizer, ["A box"], max_new_tokens=2, forced_actions=forced, return_logprobs=True,
                    eos_token_id=[])
    set_policy_backtrack(model, backtrack_token_id(tokenizer), "factorized")
    fact = generate(model, tokenizer, ["A box"], max_new_tokens=2, forced_actions=forced, return_logprobs=True,
                    eos_token_id=[])
    assert fact.backtrack_head == "factorized" and not torch.allclose(soft.logprobs, fact.logprobs)
    set_policy_backtrack(model, backtrack_token_id(tokenizer), "calibrated")
    cal = generate(model, tokenizer, ["A box"], max_new_tokens=2, forced_actions=forced, return_logprobs=True,
                   eos_token_id=[])
    assert cal.backtrack_head == "calibrated"
    torch.testing.assert_close(cal.logprobs, soft.logprobs, atol=1e-5, rtol=0)  # the softmax's values, other gradients
    bare = make_model("llama", tokenizer)
    del bare.config.backtrack_token_id
    with pytest.raises(ValueError, match="add_backtrack_token"):
        generate(bare, tokenizer, ["A box"], max_new_tokens=2)


def test_a_second_eos_from_the_generation_config_ends_env_episodes_and_rollouts_alike(tokenizer):
    """Llama-3-style: the generation config adds a stop id the tokenizer's EOS does not name."""
    model = make_model("llama", tokenizer)
    second = 9
    model.generation_config = GenerationConfig(eos_token_id=[tokenizer.eos_token_id, second])
    forced = torch.tensor([[7, 8, second, 10, 11]])
    ro = rollout(model, tokenizer, PROBLEMS[:1], max_new_tokens=5, forced_actions=forced)
    assert ro.action_mask[0].tolist() == [True, True, True] and ro.generation.finished[0]  # stopped at step 3
    env = gym.make("Backtrack-Arithmetic-v0", tokenizer=tokenizer, problems=PROBLEMS[:1], max_new_tokens=5,
                   generation_config=model.generation_config)
    env.reset(seed=0)
    ends = [env.step(a)[2] for a in [7, 8, second]]
    assert ends == [False, False, True] and env.unwrapped.text == ro.texts[0]
    plain = gym.make("Backtrack-Arithmetic-v0", tokenizer=tokenizer, problems=PROBLEMS[:1], max_new_tokens=5)
    plain.reset(seed=0)
    assert [plain.step(a)[2] for a in [7, 8, second]] == [False, False, False]


def test_evaluation_reads_the_reference_nll_through_the_scorer(tokenizer):
    """``reference_nll`` (an evaluation metric) equals the teacher-forced NLL of a fresh causal forward."""
    from halluc_rl.data.problems import encode_problem
    from halluc_rl.evaluation import reference_nll

    model = make_model("llama", tokenizer)
    pairs = [encode_problem(p, tokenizer) for p in PROBLEMS[:3]]
    prompts, refs = [p for p, _ in pairs], [r for _, r in pairs]
    total, count = 0.0, 0
    for prompt, ref in pairs:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + ref])).logits[0, len(prompt) - 1 : -1]
        logits[0, backtrack_token_id(tokenizer)] = float("-inf")  # the empty-response mask, as generation applies it
        logp = torch.log_softmax(logits, -1)
        total -= float(logp.gather(1, torch.tensor(ref).unsqueeze(1)).sum())
        count += len(ref)
    assert reference_nll(model, prompts, refs, batch_size=2) == pytest.approx(total / count, rel=1e-5)


@pytest.mark.parametrize("semantics", ["rewind", "retry"])
@pytest.mark.parametrize("arch", ["mistral", "gemma2"])
def test_scorer_on_sliding_window_models(tokenizer, arch, semantics):
    """Responses much longer than the window (8), with bursts of backtracks: in rewind the packed mask is windowed
    (per layer kind for Gemma-2's alternating layers) and the scores equal generation's, which rewinds exactly; in
    retry the context only grows past the window, and the scores equal generation's too."""
    from tests.test_cache import WINDOW, sliding_model

    model = sliding_model(arch, tokenizer, seed=1)
    bt = backtrack_token_id(tokenizer)
    g = torch.Generator().manual_seed(0)
    forced = torch.where(torch.rand(2, 40, generator=g) < 0.2, bt, -1)
    forced[:, :10] = -1
    out = generate(model, tokenizer, [p.question for p in PROBLEMS[:2]], max_new_tokens=40, do_sample=True,
                   forced_actions=forced, return_logprobs=True, eos_token_id=[], loop_guard=None, generator=g,
                   semantics=semantics)
    assert min(len(s) for s in out.sequences) > 2 * WINDOW and int(out.num_deleted.sum()) > 4
    scores = score_actions(model, out.prompt_ids, out.actions, out.config, semantics=semantics)
    torch.testing.assert_close(scores.logprobs, out.logprobs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_streams_without_backtracks_take_the_causal_path_and_stay_exact(tokenizer, arch):
    """No backtrack in the batch: plain causal sequences (a 2D mask), equal to the sampling log-probs and to the
    rewind layout's packing of the same streams."""
    from halluc_rl import scoring

    model = lora_policy(arch, tokenizer, head="softmax")
    ro = rollout(model, tokenizer, PROBLEMS, do_sample=True, max_new_tokens=20, backtrack_bias=float("-inf"),
                 generator=torch.Generator().manual_seed(5))
    packed = []
    original = scoring.pack_streams
    scoring.pack_streams = lambda *a, **k: packed.append(k.get("semantics", "rewind")) or original(*a, **k)
    try:
        fast = score_rollout(model, ro)
    finally:
        scoring.pack_streams = original
    assert packed == ["retry"]  # the causal path ran
    mask = ro.action_mask
    torch.testing.assert_close(fast.logprobs[mask], ro.logprobs[mask], atol=1e-5, rtol=0)
    streams = [p + ro.actions[b][mask[b]].tolist() for b, p in enumerate(ro.prompt_ids)]
    a = scoring.causal_streams(streams, [len(p) for p in ro.prompt_ids], ro.actions.shape[1])
    b = scoring.pack_streams(streams, [len(p) for p in ro.prompt_ids], backtrack_token_id(tokenizer),
                             num_actions=ro.actions.shape[1])
    assert torch.equal(a.predictors, b.predictors)


@pytest.mark.parametrize("arch", ARCHS)
def test_retry_scorer_equals_the_rollouts_sampling_log_probs(tokenizer, arch):
    """retry: the stream is one causal sequence with backtracks as inputs; sampled with temperature, bias, budget,
    loop guard and the factorised head, under LoRA, the scores equal the rollout's log-probs to 1e-5."""
    model = lora_policy(arch, tokenizer)
    set_policy_backtrack(model, backtrack_token_id(tokenizer), semantics="retry")
    g = torch.Generator().manual_seed(3)
    options = dict(do_sample=True, temperature=0.7, backtrack_bias=2.5, backtrack_budget=5, loop_guard=1,
                   max_new_tokens=28)
    ro = rollout(model, tokenizer, PROBLEMS, RewardMixer([RuleGrader()]), generator=g, **options)
    assert ro.generation.semantics == "retry"
    scores = score_rollout(model, ro)
    mask = ro.action_mask
    torch.testing.assert_close(scores.logprobs[mask], ro.logprobs[mask], atol=1e-5, rtol=0)
    ratio = (scores.logprobs - ro.logprobs)[mask].exp()
    torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-5, rtol=0)  # the first PPO ratio
    assert int(ro.generation.num_deleted.sum()) >= 4
    rewound = score_actions(model, ro.prompt_ids, ro.actions, ro.generation.config, semantics="rewind",
                            override_semantics=True)
    assert not torch.allclose(rewound.logprobs[mask], ro.logprobs[mask], atol=1e-3)  # the context differs
    with pytest.raises(ValueError, match="trained in 'retry', not 'rewind'.*--override_semantics"):
        score_actions(model, ro.prompt_ids, ro.actions, ro.generation.config, semantics="rewind")


def test_the_visited_memory_is_keyed_on_the_prefix_not_the_length(tokenizer):
    """loop_guard=1: deleting b after 'a' bans b after 'a' only. Row 0 goes deeper (deletes a) and types c: the
    response has the same length but another prefix, where b is allowed (a length-keyed ban would mask it). Row 1
    comes back to 'a' through another branch, where b is banned again."""
    model = lora_policy("llama", tokenizer, head="softmax")
    bt = backtrack_token_id(tokenizer)
    a, b, c, d = 7, 8, 9, 10
    actions = torch.tensor([[a, b, bt, bt, c, b], [a, b, bt, d, bt, b]])
    config = BacktrackGenerationConfig(do_sample=True, loop_guard=1)
    context = decode_context(actions, bt, config)
    bans = set(zip(*(t.tolist() for t in context.bans)))  # (row, step, token)
    assert bans == {(0, 3, b), (0, 4, a), (1, 3, b), (1, 5, b), (1, 5, d)}  # not (0, 5, b): another prefix
    prompts = [tokenizer("Question: 1\\nAnswer:")["input_ids"]] * 2
    scores = score_actions(model, prompts, actions, config)
    assert torch.isfinite(scores.logprobs[0, 5]) and scores.logprobs[1, 5] == float("-inf")
    out = generate(model, tokenizer, prompts, config, forced_actions=actions, max_new_tokens=6, return_logprobs=True,
                   eos_token_id=[])
    torch.testing.assert_close(scores.logprobs, out.logprobs, atol=1e-5, rtol=0)
