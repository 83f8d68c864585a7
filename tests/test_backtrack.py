import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from halluc_rl.backtrack import (
    BACKTRACK_TOKEN,
    ActionKind,
    BacktrackState,
    BatchedBacktrackState,
    EpisodeEnd,
    apply_actions,
    backtrack_token_id,
    correction_actions,
)

BT = 0
actions_st = st.lists(st.integers(min_value=0, max_value=5), max_size=60)  # 0 is the backtrack id


@pytest.mark.parametrize(
    "actions, visible, backtracks, deleted, failed",
    [
        ([1, 2, 3], [1, 2, 3], 0, 0, 0),
        ([1, 2, BT, 3], [1, 3], 1, 1, 0),
        ([1, BT, BT, 2], [2], 2, 1, 1),
        ([1, 2, BT, BT], [], 2, 2, 0),
        ([BT, BT], [], 2, 0, 2),
    ],
)
def test_readme_table(actions, visible, backtracks, deleted, failed):
    res = apply_actions(actions, BT)
    assert (res.visible_ids, res.num_backtracks, res.num_deleted, res.num_failed) == (
        visible, backtracks, deleted, failed)


@settings(max_examples=300, deadline=None)
@given(actions_st)
def test_incremental_equals_pure(actions):
    state = BacktrackState(BT)
    for a in actions:
        state.push(a)
    pure = apply_actions(actions, BT)
    assert state.result() == pure
    assert (state.num_backtracks, state.num_deleted, state.num_failed) == (
        pure.num_backtracks, pure.num_deleted, pure.num_failed)
    assert BT not in state.visible_ids


@settings(max_examples=200, deadline=None)
@given(actions_st, st.lists(st.integers(min_value=1, max_value=5), max_size=20))
def test_delete_then_retype_is_identity(prefix, tokens):
    before = apply_actions(prefix, BT).visible_ids
    after = apply_actions([*prefix, *tokens, *([BT] * len(tokens)), *tokens], BT).visible_ids
    assert after == before + tokens
    assert apply_actions([*prefix, *tokens, *([BT] * len(tokens))], BT).visible_ids == before


@settings(max_examples=100, deadline=None)
@given(st.lists(actions_st, min_size=1, max_size=5))
def test_batched_equals_pure(rows):
    steps = max(map(len, rows)) or 1
    state = BatchedBacktrackState(len(rows), steps, BT)
    for s in range(steps):
        acts = torch.tensor([r[s] if s < len(r) else 1 for r in rows])
        active = torch.tensor([s < len(r) for r in rows])
        state.step(acts, active)
    for b, r in enumerate(rows):
        pure = apply_actions(r, BT)
        assert state.visible(b) == pure.visible_ids
        assert int(state.num_deleted[b]) == pure.num_deleted
        assert int(state.num_failed[b]) == pure.num_failed


def test_step_outcomes_and_pop_into_prompt():
    state = BacktrackState(BT)
    assert state.push(BT).kind is ActionKind.FAILED
    assert state.push(7).kind is ActionKind.APPEND
    out = state.push(BT)
    assert (out.kind, out.deleted, out.position) == (ActionKind.DELETE, 7, 0)
    with pytest.raises(IndexError, match="prompt"):
        state.pop()


def test_correction_actions_resolve_to_prefix_plus_correction():
    acts = correction_actions([1, 2], [3, 4, 5], [6], BT)
    assert acts == [1, 2, 3, 4, 5, BT, BT, BT, 6]
    assert apply_actions(acts, BT).visible_ids == [1, 2, 6]


def test_token_id_is_looked_up_as_a_token(tokenizer):
    bt = backtrack_token_id(tokenizer)
    assert tokenizer.convert_ids_to_tokens(bt) == BACKTRACK_TOKEN
    assert tokenizer.decode([5, bt, 6], skip_special_tokens=True) == tokenizer.decode([5, 6])


def test_unknown_backtrack_token_says_how_to_add_it(tokenizer):
    with pytest.raises(ValueError, match="add_backtrack_token"):
        backtrack_token_id(tokenizer, "<|NOT_THERE|>")


def test_batched_capacity_is_checked():
    state = BatchedBacktrackState(1, 1, BT)
    state.step(torch.tensor([3]))
    with pytest.raises(ValueError, match="full"):
        state.step(torch.tensor([4]))


def test_rewind_layout_replays_the_stack():
    from halluc_rl.backtrack import ancestor_mask, rewind_layout

    # prompt 10 11 | correct 12 | error 20 21 | BT BT | correction 13 2
    acts = [10, 11, 12, 20, 21, BT, BT, 13, 2]
    trained = [False, False, True, False, False, True, True, True, True]
    lay = rewind_layout(acts, trained, BT, prompt_length=2)
    assert lay.input_ids == [10, 11, 12, 20, 21, 13, 2]  # no backtrack inputs
    assert lay.position_ids == [0, 1, 2, 3, 4, 3, 4]
    assert lay.parents == [-1, 0, 1, 2, 3, 2, 5]
    # labels[i + 1] = the action taken from the state ending at flat token i
    assert lay.labels == [-100, -100, 12, 13, BT, BT, 2]
    mask = ancestor_mask(lay.parents)
    assert mask[5].tolist() == [True, True, True, False, False, True, False]  # 13 sees prompt + 12, not the errors
    assert mask[6].tolist() == [True, True, True, False, False, True, True]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=5), min_size=1, max_size=40))
def test_rewind_layout_states_are_the_visible_prefixes(response):
    """Every flat token's ancestor chain is exactly the visible text when it was typed."""
    from halluc_rl.backtrack import ancestor_mask, rewind_layout

    prompt = [7, 8]
    acts = prompt + response
    lay = rewind_layout(acts, [True] * len(acts), BT, prompt_length=2)
    mask = ancestor_mask(lay.parents)
    flat = 0
    for k, a in enumerate(acts):
        if a == BT and k >= 2:
            continue
        visible = prompt[:k] if k < 2 else prompt + apply_actions(response[: k - 2], BT).visible_ids
        assert [lay.input_ids[j] for j in range(len(lay.input_ids)) if mask[flat, j]] == visible + [a]
        assert lay.position_ids[flat] == len(visible)
        flat += 1


def test_episode_end_terminates_on_appends_only(tokenizer):
    """EOS or a stop string ends an episode when a token is appended; a backtrack never does; the budget cuts."""
    bt, eos = backtrack_token_id(tokenizer), tokenizer.eos_token_id
    eq, three, x = (tokenizer(s, add_special_tokens=False)["input_ids"][-1] for s in (" =", "3", "x"))
    end = EpisodeEnd([eos], ("=",), max_actions=4, tokenizer=tokenizer)
    state = BatchedBacktrackState(4, 8, bt)
    state.load([[three, eq, x], [three], [three], []])
    actions = torch.tensor([bt, eq, eos, bt])  # delete back to "3 =", type "=", type EOS, a failed backtrack
    kinds, _ = state.step(actions)
    assert end.terminated(actions, kinds, state).tolist() == [False, True, True, False]
    assert not EpisodeEnd([], ("=",), tokenizer=tokenizer).terminated(actions, kinds, state)[2]  # no stop ids
    assert end.truncated(4) and not end.truncated(3) and not end.truncated(4, terminated=True)
    assert not EpisodeEnd([eos]).truncated(10**6)
    with pytest.raises(ValueError, match="tokenizer"):
        EpisodeEnd([eos], ("=",))


def test_stop_strings_read_the_whole_visible_text(tokenizer):
    """The tail the rule decodes decides like the whole visible text (special tokens skipped), even when the tail
    holds only special tokens or is short."""
    end = EpisodeEnd([], ("=", "+ 4", "ab"), tokenizer=tokenizer)
    g = torch.Generator().manual_seed(0)
    pool = torch.tensor(tokenizer(" 3 + 4 = ab", add_special_tokens=False)["input_ids"] + [0, 1, 3])  # + specials
    hits = 0
    for _ in range(300):
        ids = pool[torch.randint(len(pool), (int(torch.randint(1, 30, (1,), generator=g)),), generator=g)]
        for n in range(1, len(ids) + 1):
            text = tokenizer.decode(ids[:n].tolist(), skip_special_tokens=True)
            expected = any(text.endswith(s) for s in end.stop_strings)
            assert end.ends_with_stop_string(ids, n) == expected, (ids[:n].tolist(), text)
            hits += expected
    assert hits > 100
    ids = torch.tensor(tokenizer("3 =", add_special_tokens=False)["input_ids"] + [0] * 20)  # a tail of pads only
    assert end.ends_with_stop_string(ids, len(ids))
