"""LoRA policies and their references: wrapping a base in an adapter whose backtrack rows train, loading a saved
one, recording and checking the base an adapter belongs to (its name and a fingerprint of its weights), and the
frozen ``ref`` adapter a later stage (DPO, PPO) measures its KL against.

Every adapter made or loaded here is an ordinary PEFT model that plain TRL trainers can train
(:func:`expose_head_bias`), and its ``adapter_config.json`` records a base path that PEFT's own loaders open
offline; halluc-rl's portable name of the base (``tiny``, a known model) is kept in ``config.json``."""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import TrainableTokensWrapper

from halluc_rl.registry import is_known_name, portable_model_name, resolve_model_path

BASE_NAME_KEY = "base_model_name"
"""The ``config.json`` key (on ``model.config``) of an adapter's base by halluc-rl's portable name; PEFT's
``base_model_name_or_path`` holds a path its loaders can open."""


def tied_head(model) -> bool:
    out = model.get_output_embeddings()
    return out is None or out.weight is model.get_input_embeddings().weight


def _module_name(model, module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def base_fingerprint(model) -> str:
    """A short hash of a base model's weights (the first and last matrices outside the embeddings, rounded to
    bf16 so fp32 and bf16 loads agree): an adapter records it and refuses a base of the same shape but other weights.
    """
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


@contextmanager
def quiet_checkpointing_alias() -> Iterator[None]:
    """Silence the deprecations PEFT and TRL raise inside their own code: they call transformers' old
    ``model.is_gradient_checkpointing`` and ``gradient_checkpointing_enable/disable`` (now ``activation_...``).
    Nothing else is filtered."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message="`(is_gradient_checkpointing|"
                                "gradient_checkpointing_enable|gradient_checkpointing_disable)` is deprecated")
        yield


def expose_head_bias(model) -> None:
    """Let plain TRL trainers read the head's bias on a policy whose untied ``lm_head`` backtrack row trains.

    TRL's fused output layer reads ``lm_head.weight`` and ``lm_head.bias``. PEFT's ``TrainableTokensWrapper``
    answers ``weight`` (the merged weight, backtrack row included, with gradients) but not ``bias``; its forward is
    ``F.linear(x, weight)``, with no bias. A wrapped bias-free Linear therefore gets ``bias = None``: what its
    forward uses, so the fused head computes exactly the model's logits. A head with a bias is left as it is.
    """
    for module in model.modules():
        base = module.original_module if isinstance(module, TrainableTokensWrapper) else None
        if isinstance(base, torch.nn.Linear) and base.bias is None and "bias" not in vars(module):
            module.bias = None


def make_lora_model(model, lora_args, backtrack_id: int):
    """Wrap ``model`` in a PEFT LoRA adapter whose backtrack rows are trainable and saved with it.

    The input row always; the output row too when the head is untied (PEFT ``trainable_token_indices`` on both
    the embedding and the ``lm_head`` Linear). Everything else of the base stays frozen. The base's fingerprint
    goes on ``model.config`` (saved with the adapter), so loading it on another base is refused. Plain TRL
    trainers can train the result (:func:`expose_head_bias`).
    """
    model.config.base_fingerprint = base_fingerprint(model)
    targets = [m for m in lora_args.lora_target_modules
               if any(name.endswith(m) for name, _ in model.named_modules())]
    if not targets:
        raise ValueError(
            f"none of lora_target_modules={lora_args.lora_target_modules} exists in {type(model).__name__}; "
            "name its attention/MLP Linear layers (e.g. q_proj, v_proj for Llama/Qwen2, c_attn for GPT-2)"
        )
    rows = {_module_name(model, model.get_input_embeddings()): [backtrack_id]}
    if not tied_head(model):
        rows[_module_name(model, model.get_output_embeddings())] = [backtrack_id]
    config = LoraConfig(r=lora_args.lora_r, lora_alpha=lora_args.lora_alpha, lora_dropout=lora_args.lora_dropout,
                        target_modules=targets, trainable_token_indices=rows, task_type="CAUSAL_LM")
    with quiet_checkpointing_alias():
        policy = get_peft_model(model, config)
    expose_head_bias(policy)
    return policy


def load_adapter(model, folder: str | Path, trainable: bool = False) -> PeftModel:
    """Put the saved adapter in ``folder`` on ``model`` (its base, loaded by :mod:`halluc_rl.modeling`).

    The adapter then records the base's loadable path (``model.name_or_path``) for PEFT, whatever an older copy
    recorded, so a policy saved again opens with PEFT's own loaders; plain TRL trainers can train it.
    """
    with quiet_checkpointing_alias():
        policy = PeftModel.from_pretrained(model, str(folder), is_trainable=trainable)
    for config in policy.peft_config.values():
        config.base_model_name_or_path = model.__dict__.get("name_or_path") or config.base_model_name_or_path
    expose_head_bias(policy)
    return policy


def base_model_name(path: str | Path) -> str | None:
    """The base model a saved adapter was trained from, by the name halluc-rl loads it with (None when ``path``
    is a full model): PEFT's ``base_model_name_or_path`` when it is here (the embedded or a known model's folder
    read back as its name), else the portable name in the adapter's ``config.json`` (the path was another
    machine's)."""
    folder = Path(path)
    adapter = folder / "adapter_config.json"
    if not adapter.exists():
        return None
    recorded = json.loads(adapter.read_text()).get("base_model_name_or_path")
    if recorded and (is_known_name(recorded) or Path(recorded).exists()):
        return portable_model_name(recorded)
    config = folder / "config.json"
    portable = json.loads(config.read_text()).get(BASE_NAME_KEY) if config.exists() else None
    return portable or recorded


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


SHAPE_KEYS: tuple[str, ...] = ("model_type", "hidden_size", "num_hidden_layers", "n_embd", "n_layer",
                               "intermediate_size", "num_attention_heads")


def check_adapter_base(folder: Path, base: str, model) -> None:
    """Refuse a base whose shape or weights differ from the adapter's, in one line naming both."""
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
