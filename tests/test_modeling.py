import pytest
import torch

from halluc_rl.backtrack import BACKTRACK_TOKEN, backtrack_token_id
from halluc_rl.modeling import INIT_WORDS, _single_token_ids, add_backtrack_token, load_model
from halluc_rl.tiny import build_tiny_model, train_tokenizer
from tests.conftest import CORPUS


def fresh_tokenizer(extra=()):
    specials = ["<pad>", "<s>", "</s>", "<unk>", *extra]
    return train_tokenizer(CORPUS * 4 + ["delete undo remove erase"] * 50, vocab_size=400, special_tokens=specials)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # untied head, tied head
def test_added_rows_are_the_mean_of_init_words(arch):
    tok = fresh_tokenizer()
    model = build_tiny_model(arch, vocab_size=len(tok), hidden_size=32, num_layers=1)
    before_in = model.get_input_embeddings().weight.detach().clone()
    before_out = model.get_output_embeddings().weight.detach().clone()
    bt = add_backtrack_token(model, tok)
    assert tok.convert_ids_to_tokens(bt) == BACKTRACK_TOKEN and bt == len(tok) - 1
    seeds = _single_token_ids(tok, INIT_WORDS)
    assert seeds, "the corpus has delete/remove/undo as single tokens"
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == len(tok)
    torch.testing.assert_close(emb[bt], before_in[seeds].mean(0))
    out = model.get_output_embeddings().weight
    if model.config.tie_word_embeddings:
        assert out.data_ptr() == emb.data_ptr()
    else:
        torch.testing.assert_close(out[bt], before_out[seeds].mean(0))
    assert model.config.backtrack_token_id == bt


def test_idempotent_never_resets_a_trained_row():
    tok = fresh_tokenizer()
    model = build_tiny_model("llama", vocab_size=len(tok), hidden_size=32, num_layers=1)
    bt = add_backtrack_token(model, tok)
    with torch.no_grad():
        model.get_input_embeddings().weight[bt] = 3.0  # "trained"
    n = len(tok)
    assert add_backtrack_token(model, tok) == bt
    assert len(tok) == n and bool((model.get_input_embeddings().weight[bt] == 3.0).all())


def test_tokenizer_that_already_has_the_token_resizes_a_base_model():
    tok = fresh_tokenizer()
    model = build_tiny_model("llama", vocab_size=len(tok), hidden_size=32, num_layers=1)
    tok.add_special_tokens({"additional_special_tokens": [BACKTRACK_TOKEN]})  # e.g. a tokenizer saved after SFT
    bt = add_backtrack_token(model, tok)
    assert bt == backtrack_token_id(tok) and model.get_input_embeddings().weight.shape[0] == len(tok)


def test_reserved_token_is_reused_and_remembered(tmp_path):
    tok = fresh_tokenizer(extra=["<|reserved_special_token_0|>"])
    model = build_tiny_model("llama", vocab_size=len(tok), hidden_size=32, num_layers=1)
    n = len(tok)
    bt = add_backtrack_token(model, tok)
    assert len(tok) == n and tok.convert_ids_to_tokens(bt) == "<|reserved_special_token_0|>"
    assert backtrack_token_id(tok) == bt
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    assert backtrack_token_id(AutoTokenizer.from_pretrained(tmp_path)) == bt


def test_no_init_word_uses_the_mean_of_all_rows():
    tok = train_tokenizer(["zz qq"] * 4, vocab_size=270, special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
    model = build_tiny_model("llama", vocab_size=len(tok), hidden_size=32, num_layers=1)
    before = model.get_input_embeddings().weight.detach().clone()
    bt = add_backtrack_token(model, tok)
    if _single_token_ids(tok, INIT_WORDS):
        pytest.skip("the byte tokenizer happens to keep an init word whole")
    keep = torch.arange(before.shape[0]) != bt
    torch.testing.assert_close(model.get_input_embeddings().weight[bt], before[keep].mean(0))


def test_missing_model_names_the_offline_alternative():
    with pytest.raises(OSError, match="embedded tiny model"):
        load_model("/nonexistent/model/dir")
