"""Loading: models, tokenizers, saved policies and the backtrack token, the one place that reads weights.

Nothing remote is trusted by default: ``trust_remote_code`` is off and weights load as safetensors. Where a model
comes from by name is :mod:`halluc_rl.registry`; LoRA adapters and references are :mod:`halluc_rl.adapters`; a
policy's backtrack settings are :mod:`halluc_rl.policy`; the tiny model's recipe is :mod:`halluc_rl.tiny`.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from halluc_rl.adapters import (
    BASE_NAME_KEY,
    add_reference_adapter,
    base_model_name,
    check_adapter_base,
    load_adapter,
    make_lora_model,
    tied_head,
)
from halluc_rl.backtrack import BACKTRACK_TOKEN, backtrack_token_id
from halluc_rl.policy import saved_backtrack_settings, set_policy_backtrack
from halluc_rl.registry import (
    ASSETS_DIR,
    drop_gguf_quantizer,
    is_known_name,
    require_gguf,
    resolve_model_path,
    split_gguf,
)

INIT_WORDS: tuple[str, ...] = ("delete", "remove", "undo", "erase", "back", "cancel", "backspace", "wrong", "oops")
"""Words whose embeddings seed the backtrack row: it starts out meaning 'take that back'."""

RESERVED_TOKENS: tuple[str, ...] = ("<|reserved_special_token_0|>",)
"""Reserved special tokens a backtrack token may reuse (Llama-3), so the vocabulary does not grow."""

_MARKER = "backtrack_token"  # tokenizer init kwarg recording which token string plays the backtrack role



def _single_token_ids(tokenizer, words: Iterable[str]) -> list[int]:
    """Ids of the words (with or without a leading space) that the tokenizer keeps as one non-special token."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids: set[int] = set()
    for word in words:
        for variant in (word, " " + word, word.capitalize(), " " + word.capitalize()):
            enc = tokenizer(variant, add_special_tokens=False)["input_ids"]
            if len(enc) == 1 and enc[0] not in special:
                ids.add(int(enc[0]))
    return sorted(ids)


def add_backtrack_token(
    model,
    tokenizer,
    token: str = BACKTRACK_TOKEN,
    init_words: Sequence[str] = INIT_WORDS,
    reuse_reserved: bool = True,
) -> int:
    """Give ``tokenizer`` and ``model`` a backtrack token and return its id.

    The token is added as a special token (or a reserved special token such as Llama-3's
    ``<|reserved_special_token_0|>`` is reused), the embeddings are resized, and the new input row - and output row
    when the head is untied - is initialised to the mean of the rows of words like delete/remove/undo (the mean of all
    rows when the tokenizer has none of them).

    Idempotent: when the tokenizer already has the token and the model's embeddings cover it, nothing changes, so a
    trained backtrack row is never re-initialised.
    """
    try:
        bt_id = backtrack_token_id(tokenizer, token)
        known = True
    except ValueError:
        known = False
    if known:
        if model.get_input_embeddings().weight.shape[0] > bt_id:
            set_policy_backtrack(model, bt_id)  # already set up (and perhaps trained): only record the id
            return bt_id
    else:
        vocab = tokenizer.get_vocab()
        reserved = next((t for t in RESERVED_TOKENS if reuse_reserved and t in vocab), None)
        if reserved is not None:
            tokenizer.init_kwargs[_MARKER] = reserved
            bt_id = int(vocab[reserved])
        else:
            tokenizer.add_special_tokens({"additional_special_tokens": [token]}, replace_extra_special_tokens=False)
            bt_id = backtrack_token_id(tokenizer, token)

    if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    init_backtrack_rows(model, tokenizer, bt_id, init_words)
    return bt_id


@torch.no_grad()
def init_backtrack_rows(model, tokenizer, bt_id: int, init_words: Sequence[str] = INIT_WORDS) -> None:
    """Set the backtrack token's input row (and output row when untied) to the mean of the init words' rows.

    The mean of every other row when no init word is a single token.
    """
    seed_ids = _single_token_ids(tokenizer, init_words)
    for emb in [model.get_input_embeddings()] + ([] if tied_head(model) else [model.get_output_embeddings()]):
        weight = emb.weight  # [V, H]
        if seed_ids:
            rows = weight[seed_ids]  # [n_words, H]
        else:  # no init word is a single token: the mean of every other row
            keep = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
            keep[bt_id] = False
            rows = weight[keep]  # [V - 1, H]
        weight[bt_id] = rows.float().mean(0).to(weight.dtype)
        if getattr(emb, "bias", None) is not None:
            emb.bias[bt_id] = emb.bias[seed_ids].mean() if seed_ids else emb.bias.mean()
    set_policy_backtrack(model, bt_id)


def _offline_hint(name: str, err: Exception) -> str:
    return (
        f"could not load {name!r} ({type(err).__name__}: {' '.join(str(err).split())}). If it is a Hub id, it is "
        "not reachable from here "
        f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}), gated (log in and accept its licence), or has no "
        "safetensors weights. Give a local directory, a model fetched with `halluc-rl models get NAME` (see "
        "`halluc-rl models list`), or the embedded tiny model: model_name_or_path: tiny."
    )


DTYPES = ("float32", "bfloat16", "float16", "auto")


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, revision: str | None = None,
                   gguf_file: str | None = None):
    """Load a tokenizer (safe defaults); left padding for batched generation.

    ``gguf_file`` (or a ``name_or_path`` ending in ``.gguf``) reads the tokenizer embedded in a llama.cpp GGUF file.
    """
    from transformers import AutoTokenizer

    path, gguf_file = split_gguf(resolve_model_path(name_or_path), gguf_file)
    if gguf_file is not None:
        require_gguf()
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision,
                                            **({"gguf_file": gguf_file} if gguf_file is not None else {}))
    except (OSError, ValueError) as err:
        raise OSError(_offline_hint(name_or_path, err)) from err
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    name_or_path: str,
    dtype: str | torch.dtype = "float32",
    trust_remote_code: bool = False,
    revision: str | None = None,
    device_map: str | None = None,
    gguf_file: str | None = None,
):
    """Load a causal LM from safetensors only (``use_safetensors=True``), without remote code unless asked.

    ``gguf_file`` (or a ``name_or_path`` ending in ``.gguf``) loads a llama.cpp GGUF file instead, dequantised to
    ``dtype`` into ordinary layers (trainable, savable as safetensors); it needs the ``gguf`` package.
    """
    from transformers import AutoModelForCausalLM

    path, gguf_file = split_gguf(resolve_model_path(name_or_path), gguf_file)
    if isinstance(dtype, str) and dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
    weights: dict = {"use_safetensors": True}
    if gguf_file is not None:  # the weights are the GGUF's own tensors (no pickle): unpack them into plain layers
        require_gguf()
        from transformers import GgufConfig

        weights = {"gguf_file": gguf_file, "quantization_config": GgufConfig(gguf_file=gguf_file, dequantize=True)}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=torch_dtype,
            trust_remote_code=trust_remote_code,
            revision=revision,
            device_map=device_map,
            **weights,
        )
    except OSError as err:
        raise OSError(_offline_hint(name_or_path, err)) from err
    if gguf_file is not None:
        drop_gguf_quantizer(model)
    # what an adapter records for its base: PEFT's base_model_name_or_path is a path its loaders open offline (the
    # folder, made absolute; a Hub id as given), and halluc-rl's portable name (a known name as such) is saved
    # beside it in config.json
    loadable = str(Path(path).resolve()) if Path(path).exists() else name_or_path
    portable = name_or_path if is_known_name(name_or_path) else loadable
    model.name_or_path = loadable
    model.config.name_or_path = portable
    setattr(model.config, BASE_NAME_KEY, portable)
    return model


def load_model_and_tokenizer(name_or_path: str, add_backtrack: bool = True, **kwargs):
    """Load both, and give them the backtrack token (idempotent). Returns (model, tokenizer, backtrack_id)."""
    tok_kwargs = {k: kwargs[k] for k in ("trust_remote_code", "revision") if k in kwargs}
    tokenizer = load_tokenizer(name_or_path, **tok_kwargs)
    model = load_model(name_or_path, **kwargs)
    bt_id = add_backtrack_token(model, tokenizer) if add_backtrack else None
    return model, tokenizer, bt_id


# ----------------------------------------------------------------------------------------------------------------
# The one tiny-model recipe (tests, benchmarks and `halluc-rl pretrain` all build from here)
# ----------------------------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------------------
# LoRA policies
# ----------------------------------------------------------------------------------------------------------------


SAVED_WEIGHTS: dict[str, tuple[str, str]] = {
    "adapter_config.json": ("adapter_model.safetensors", "adapter_model.bin"),
    "config.json": ("model.safetensors", "pytorch_model.bin"),
}
"""A saved folder's config file -> (its safetensors weights, the pickle file halluc-rl refuses to load)."""


def check_saved_model(folder: str | Path) -> None:
    """Check a saved model or adapter folder's files without loading its weights: a config that is JSON, weights
    as safetensors (a pickle-only folder is refused: nothing remote is unpickled) with a header that reads. Raises
    a one-line ValueError naming the file and the fix. A folder with neither config file is left to the loader."""
    folder = Path(folder)
    kind = "adapter_config.json" if (folder / "adapter_config.json").exists() else "config.json"
    if not (folder / kind).exists():
        return
    try:
        config = json.loads((folder / kind).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{folder / kind} is not valid JSON ({err}); re-save the model, or restore the file") from err
    if not isinstance(config, dict) or (kind == "adapter_config.json" and "peft_type" not in config):
        raise ValueError(f"{folder / kind} is not a {'PEFT adapter' if kind != 'config.json' else 'model'} config; "
                         "re-save the model, or restore the file")
    safe, pickle = SAVED_WEIGHTS[kind]
    shards = [folder / safe] if (folder / safe).exists() else sorted(folder.glob("model-*.safetensors"))
    if not shards:
        if (folder / pickle).exists():
            raise ValueError(f"{folder} holds {pickle} only, a pickle halluc-rl does not load; convert it once where "
                             "you trust it: load it with transformers/PEFT and save_pretrained(folder, "
                             "safe_serialization=True)")
        raise ValueError(f"{folder} holds no weights ({safe}); point at the folder a run saved its model to")
    for shard in shards:
        try:
            with safe_open(str(shard), "pt") as handle:
                handle.keys()
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{shard} is damaged ({' '.join(str(err).split())}); the run that wrote it was "
                             "interrupted: use another checkpoint, or retrain") from err


def load_policy(path: str | Path, dtype: str = "float32", trust_remote_code: bool = False,
                add_missing_backtrack: bool = False, trainable: bool = False):
    """Load a saved policy for generation: a full model directory, or a PEFT adapter on its base.

    Returns (model, tokenizer, backtrack_id), with the backtrack settings on ``model.config``, read from the saved
    config (never guessed: a policy folder that records none is read as ``softmax`` with a warning). An adapter
    directory must hold the tokenizer saved with it. A full model without a backtrack token (a base model) raises,
    or with ``add_missing_backtrack`` gets an untrained one (with a warning), so that it can still be evaluated with
    and without backtracking. ``trainable`` loads an adapter ready to train on (a later stage continuing it).
    """
    folder = Path(resolve_model_path(str(path)))
    check_saved_model(folder)
    base = base_model_name(folder)
    tokenizer = load_tokenizer(str(path), trust_remote_code=trust_remote_code)
    if base is None:
        model = load_model(str(path), dtype=dtype, trust_remote_code=trust_remote_code)
    else:
        model = load_model(base, dtype=dtype, trust_remote_code=trust_remote_code)
        check_adapter_base(folder, base, model)
        if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        model = load_adapter(model, folder, trainable=trainable)
    for name, param in model.named_parameters():
        if not bool(torch.isfinite(param.detach()).all()):
            raise ValueError(f"policy {path} has non-finite weights ({name}); the run that saved it diverged: "
                             "retrain it with a lower learning rate")
    try:
        bt = backtrack_token_id(tokenizer)
    except ValueError:
        if not (add_missing_backtrack and base is None):
            raise
        warnings.warn(f"{path} has no backtrack token; adding an untrained one", stacklevel=2)
        return model.eval(), tokenizer, add_backtrack_token(model, tokenizer)
    saved = saved_backtrack_settings(folder)
    if saved.get("backtrack_token_id", bt) != bt:
        raise ValueError(f"{path}: config.json records backtrack id {saved['backtrack_token_id']} but the tokenizer "
                         f"saved with it has {bt}; save the policy's tokenizer and config together")
    if "backtrack_head" not in saved and folder.resolve().parent != ASSETS_DIR:
        warnings.warn(f"{path} records no backtrack head in config.json; reading its backtrack logit as softmax "
                      "(re-save the policy with this version of halluc-rl to record it)", stacklevel=2)
    set_policy_backtrack(model, bt, saved.get("backtrack_head", "softmax"), saved.get("backtrack_semantics"))
    return model.eval(), tokenizer, bt


def load_start_policy(name: str, lora_args, dtype: str = "float32", trust_remote_code: bool = False,
                      revision: str | None = None, reference: bool = False):
    """The policy a training stage starts from: ``(model, tokenizer, backtrack_id)``.

    A saved adapter (an earlier stage) is continued, trainable, and with ``reference`` gets a frozen copy of itself
    as the ``ref`` adapter; a model gets a fresh LoRA adapter (:func:`make_lora_model`; its reference is the adapter
    disabled), or trains every weight with ``use_lora: false``.
    """
    if not is_known_name(name) and base_model_name(resolve_model_path(name)) is not None:
        model, tokenizer, bt = load_policy(name, dtype=dtype, trust_remote_code=trust_remote_code, trainable=True)
        if reference:
            add_reference_adapter(model)
        return model, tokenizer, bt
    model, tokenizer, bt = load_model_and_tokenizer(name, dtype=dtype, trust_remote_code=trust_remote_code,
                                                    revision=revision)
    return (make_lora_model(model, lora_args, bt) if lora_args.use_lora else model), tokenizer, bt


# ----------------------------------------------------------------------------------------------------------------
# Known pretrained models: fetched once by `halluc-rl models get NAME`, then loaded by name from the local cache
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def backtrack_init_report(model, tokenizer, bt_id: int, k: int = 10,
                          init_words: Sequence[str] = INIT_WORDS) -> dict:
    """How the backtrack row was initialised on this vocabulary, for a human to judge.

    Returns a JSON-ready dict: which ``init_words`` are single tokens (the same lookup :func:`init_backtrack_rows`
    uses), whether the row is still their mean, and the row's ``k`` nearest tokens by cosine similarity (input
    embeddings; the output head too when it is untied). A row whose neighbours are 'delete'-like words starts out
    meaning 'take that back'; one near unrelated tokens shows the init had little to work with.
    """
    seed_ids = _single_token_ids(tokenizer, init_words)
    found = {w: [tokenizer.convert_ids_to_tokens(i) for i in _single_token_ids(tokenizer, [w])] for w in init_words}

    def neighbours(weight: torch.Tensor) -> list[dict]:
        w = weight.detach().float()  # [V, H]
        sims = torch.nn.functional.cosine_similarity(w, w[bt_id].unsqueeze(0), dim=-1)  # [V]
        sims[bt_id] = float("-inf")
        top = torch.topk(sims, min(k, w.shape[0] - 1))
        return [{"id": int(i), "token": tokenizer.convert_ids_to_tokens(int(i)), "text": tokenizer.decode([int(i)]),
                 "cosine": round(float(s), 4)} for s, i in zip(top.values, top.indices)]

    emb = model.get_input_embeddings().weight  # [V, H]
    report = {
        "backtrack_id": int(bt_id),
        "backtrack_token": tokenizer.convert_ids_to_tokens(int(bt_id)),
        "vocab_rows": int(emb.shape[0]),
        "tied_head": tied_head(model),
        "init_words_found": {w: toks for w, toks in found.items() if toks},
        "init_words_missing": [w for w, toks in found.items() if not toks],
        "init_ids": seed_ids,
        "init_tokens": [tokenizer.convert_ids_to_tokens(i) for i in seed_ids],
        "row_is_init_mean": bool(seed_ids) and bool(torch.allclose(emb[bt_id].float(), emb[seed_ids].float().mean(0),
                                                                     atol=1e-6, rtol=0)),
        "row_norm": round(float(emb[bt_id].float().norm()), 4),
        "mean_row_norm": round(float(emb.float().norm(dim=-1).mean()), 4),
        "nearest_input": neighbours(emb),
    }
    if not tied_head(model):
        report["nearest_output"] = neighbours(model.get_output_embeddings().weight)
    return report
