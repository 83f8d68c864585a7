import pytest
import torch
from torch.utils.data import DataLoader

from halluc_rl.backtrack import backtrack_token_id
from halluc_rl.data.arithmetic import ArithmeticTask
from halluc_rl.data.collator import MaskedErrorCollator
from halluc_rl.data.errors import RandomTokenErrors, build_examples
from halluc_rl.data.examples import assemble_example
from halluc_rl.data.problems import encode_problem
from tests.conftest import ARCHS, make_model

BT = 4
# prompt 10 11 | correct 20 | error 30 31 | backtrack BT BT | correction 21 2
ERR = {"input_ids": [10, 11, 20, 30, 31, BT, BT, 21, 2],
       "spans": [("prompt", 0, 2), ("correct", 2, 3), ("error", 3, 5), ("backtrack", 5, 7), ("correction", 7, 9)]}
CLEAN = {"input_ids": [10, 12, 22, 2], "spans": [("prompt", 0, 2), ("correct", 2, 4)]}
X = -100


pytestmark = pytest.mark.usefixtures("one_thread")


def test_default_padding_and_labels():
    batch = MaskedErrorCollator(layout="retry", pad_token_id=0)([ERR, CLEAN])
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].tolist() == [[10, 11, 20, 30, 31, BT, BT, 21, 2], [10, 12, 22, 2, 0, 0, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1] * 9, [1, 1, 1, 1, 0, 0, 0, 0, 0]]
    assert batch["labels"].tolist() == [[X, X, 20, X, X, BT, BT, 21, 2], [X, X, 22, 2, X, X, X, X, X]]
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long


def test_train_errors_ablation_and_dict_spans():
    as_dicts = {"input_ids": ERR["input_ids"],
                "spans": [{"kind": k, "start": s, "end": e} for k, s, e in ERR["spans"]]}
    batch = MaskedErrorCollator(layout="retry", pad_token_id=0, train_errors=True)([as_dicts])
    assert batch["labels"].tolist() == [[X, X, 20, 30, 31, BT, BT, 21, 2]]


def test_max_length_and_pad_to_multiple_of():
    collator = MaskedErrorCollator(layout="retry", pad_token_id=0, max_length=6, pad_to_multiple_of=4)
    batch = collator([ERR, CLEAN])
    assert batch["input_ids"].tolist() == [[10, 11, 20, 30, 31, BT, 0, 0], [10, 12, 22, 2, 0, 0, 0, 0]]
    assert batch["labels"].tolist() == [[X, X, 20, X, X, BT, X, X], [X, X, 22, 2, X, X, X, X]]
    assert batch["attention_mask"].tolist() == [[1] * 6 + [0] * 2, [1] * 4 + [0] * 4]


def test_precomputed_labels_mask_and_errors():
    feature = {"input_ids": torch.tensor([5, 6, 7]), "labels_mask": [False, True, True]}
    batch = MaskedErrorCollator(layout="retry", pad_token_id=0)([feature])
    assert batch["labels"].tolist() == [[X, 6, 7]]
    with pytest.raises(ValueError, match="spans"):
        MaskedErrorCollator(layout="rewind")([feature])
    with pytest.raises(ValueError, match="spans"):
        MaskedErrorCollator(layout="retry")([{"input_ids": [1, 2]}])
    with pytest.raises(ValueError, match="cover"):
        MaskedErrorCollator(layout="retry")([{"input_ids": [1, 2, 3], "spans": [("prompt", 0, 1), ("correct", 1, 2)]}])


def _batch(tokenizer, n=3, seed=0):
    problems = ArithmeticTask(seed=seed).problems("train", n)
    source = RandomTokenErrors(error_rate=1.0, max_errors=2, error_length=(2, 3), seed=seed)
    return problems, build_examples(problems, tokenizer, source)


@pytest.mark.parametrize("arch", ARCHS)
def test_retry_layout_trains_on_the_logits_generation_computes(tokenizer, arch):
    """retry: every label is trained on logits equal to a fresh forward over the action stream before it (errors
    and backtracks in context, as retry generation feeds them), and corrections do see the errors they replace."""
    model = make_model(arch, tokenizer)
    problems, examples = _batch(tokenizer)
    bt = backtrack_token_id(tokenizer)
    batch = MaskedErrorCollator(layout="retry", pad_token_id=tokenizer.pad_token_id, backtrack_token_id=bt)(
        [e.to_features() for e in examples])
    assert set(batch) == {"input_ids", "attention_mask", "labels"} and batch["attention_mask"].ndim == 2
    with torch.no_grad():
        logits = model(**batch).logits  # [B, L, V]
    checked, differs = 0, False
    for b, (problem, example) in enumerate(zip(problems, examples)):
        assert int((batch["input_ids"][b] == bt).sum()) == example.input_ids.count(bt) > 0  # backtracks are inputs
        for i in torch.nonzero(batch["labels"][b] != X).flatten().tolist():
            with torch.no_grad():
                fresh = model(input_ids=torch.tensor([example.input_ids[:i]])).logits[0, -1]  # [V]
            torch.testing.assert_close(logits[b, i - 1], fresh, atol=1e-5, rtol=1e-5)
            checked += 1
        prompt, response = encode_problem(problem, tokenizer)
        visible = len(prompt)
        for kind, start, end in example.spans:  # corrections: not what the clean sequence gives (the errors show)
            if kind == "correction":
                with torch.no_grad():
                    clean = model(input_ids=torch.tensor([prompt + response[: visible - len(prompt)]])).logits[0, -1]
                differs |= not torch.allclose(logits[b, start - 1], clean, atol=1e-3)
            visible += end - start if kind in ("correct", "correction") else 0
    assert checked > 20 and differs


def test_labels_of_built_examples_and_right_padding(tokenizer):
    """Errors are never targets, every backtrack is; a padded row computes what it computes alone."""
    model = make_model("llama", tokenizer)
    _, examples = _batch(tokenizer, n=2, seed=1)
    features = [e.to_features() for e in examples]
    collator = MaskedErrorCollator(layout="retry", pad_token_id=tokenizer.pad_token_id)
    batch = collator(features)
    bt = backtrack_token_id(tokenizer)
    for b, example in enumerate(examples):
        for kind, start, end in example.spans:
            labels = batch["labels"][b, start:end].tolist()
            if kind in ("prompt", "error"):
                assert labels == [X] * (end - start)
            else:
                assert labels == example.input_ids[start:end]
        assert int((batch["labels"][b] == bt).sum()) == example.input_ids.count(bt) > 0
    short = min(range(2), key=lambda b: len(features[b]["input_ids"]))
    n = len(features[short]["input_ids"])
    assert n < batch["input_ids"].shape[1]
    with torch.no_grad():
        alone = model(**collator(features[short : short + 1])).logits[0]  # [n, V]
        padded = model(**batch).logits[short, :n]  # [n, V]
    torch.testing.assert_close(padded, alone, atol=1e-4, rtol=1e-4)


@pytest.mark.filterwarnings("ignore:.*gradient_checkpointing.*:FutureWarning")  # raised inside TRL's SFTConfig
def test_works_in_a_dataloader_and_sft_trainer(tokenizer, tmp_path):
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    _, examples = _batch(tokenizer, n=4)
    features = [e.to_features() for e in examples]
    collator = MaskedErrorCollator(pad_token_id=tokenizer.pad_token_id, backtrack_token_id=backtrack_token_id(tokenizer))
    loader = DataLoader(features, batch_size=2, collate_fn=collator)
    shapes = [tuple(b["attention_mask"].shape) for b in loader]
    assert [s[:2] for s in shapes] == [(2, 1), (2, 1)]

    model = make_model("llama", tokenizer)
    before = model.model.embed_tokens.weight.detach().clone()
    config = trl.SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
                           remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True},
                           report_to=[], save_strategy="no", use_cpu=True, logging_steps=1, disable_tqdm=True)
    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(features),
                             processing_class=tokenizer, data_collator=collator)
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert not torch.equal(before, model.model.embed_tokens.weight.detach())


def test_rewind_layout_exact_tensors():
    """prompt 10 11 | correct 20 | error 30 31 | BT BT | correction 21 2, in the default rewind layout."""
    batch = MaskedErrorCollator(pad_token_id=0, backtrack_token_id=BT, mask_dtype=torch.bool)([ERR, CLEAN])
    # backtracks are not inputs; the correction 21 sits at position 3, where the error was typed
    assert batch["input_ids"].tolist() == [[10, 11, 20, 30, 31, 21, 2], [10, 12, 22, 2, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3, 4], [0, 1, 2, 3, 4, 5, 6]]
    # labels[i + 1] is the action taken from the state ending at token i:
    # 11 -> 20; 20 -> 21 (the correction, after both deletions); 30 -> BT; 31 -> BT; 21 -> 2
    assert batch["labels"].tolist() == [[X, X, 20, 21, BT, BT, 2], [X, X, 22, 2, X, X, X]]
    mask = batch["attention_mask"][0, 0].int().tolist()
    assert mask[5] == [1, 1, 1, 0, 0, 1, 0]  # the correction does not see the errors
    assert mask[4] == [1, 1, 1, 1, 1, 0, 0]  # the second error sees the first
    assert batch["attention_mask"][1, 0, 5].int().tolist() == [0, 0, 0, 0, 0, 1, 0]  # padding sees itself


def test_a_revealed_error_trains_backtracks_from_every_state_of_its_reveal():
    """prompt 10 11 | correct 20 | error 30 | reveal 31 32 | BT BT BT | correction 21 2. In the rewind layout each
    state of the reveal is later backtracked from, and that label wins: the reveal is input, not target. The retry
    layout trains the reveal's tokens."""
    example = assemble_example([10, 11], [20, 21, 2], [(1, [30, 31, 32], 2)], BT)
    assert example.spans == [("prompt", 0, 2), ("correct", 2, 3), ("error", 3, 4), ("reveal", 4, 6),
                             ("backtrack", 6, 9), ("correction", 9, 11)]
    rewind = MaskedErrorCollator(pad_token_id=0, backtrack_token_id=BT)([example.to_features()])
    assert rewind["input_ids"].tolist() == [[10, 11, 20, 30, 31, 32, 21, 2]]
    assert rewind["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 3, 4]]
    assert rewind["labels"].tolist() == [[X, X, 20, 21, BT, BT, BT, 2]]
    retry = MaskedErrorCollator(layout="retry", pad_token_id=0, backtrack_token_id=BT)([example.to_features()])
    assert retry["input_ids"].tolist() == [[10, 11, 20, 30, 31, 32, BT, BT, BT, 21, 2]]
    assert retry["labels"].tolist() == [[X, X, 20, X, 31, 32, BT, BT, BT, 21, 2]]
    assert retry["attention_mask"].tolist() == [[1] * 11]  # the correction sees the error and its reveal


def test_rewind_layout_refuses_train_errors():
    """Every state an error is typed from is left again by a backtrack or the correction: the flag would do nothing."""
    with pytest.raises(ValueError, match="layout='retry'"):
        MaskedErrorCollator(pad_token_id=0, train_errors=True)


@pytest.mark.parametrize("arch", ARCHS)
def test_rewind_layout_trains_on_the_logits_generation_computes(tokenizer, arch):
    """Every label is trained on logits equal to a fresh forward over the visible state it was taken from."""
    model = make_model(arch, tokenizer)
    _, examples = _batch(tokenizer, n=3, seed=2)
    features = [e.to_features() for e in examples]
    bt = backtrack_token_id(tokenizer)
    batch = MaskedErrorCollator(pad_token_id=tokenizer.pad_token_id, backtrack_token_id=bt)(features)
    with torch.no_grad():
        logits = model(**batch).logits  # [B, L, V]
    assert int((batch["input_ids"] == bt).sum()) == 0
    checked = 0
    for b, example in enumerate(examples):
        allowed = batch["attention_mask"][b, 0] == 0  # additive mask: 0 where attending
        n_bt = int((batch["labels"][b] == bt).sum())
        assert n_bt == example.input_ids.count(bt)
        for i in torch.nonzero(batch["labels"][b, 1:] != X).flatten().tolist():
            visible = batch["input_ids"][b][allowed[i]].tolist()  # the state: visible tokens up to flat i
            with torch.no_grad():
                fresh = model(input_ids=torch.tensor([visible])).logits[0, -1]
            torch.testing.assert_close(logits[b, i], fresh, atol=1e-4, rtol=1e-4)
            checked += 1
    assert checked > 20
