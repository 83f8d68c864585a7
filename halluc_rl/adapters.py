"""LoRA policies and their references: wrapping a base in an adapter whose backtrack rows train, recording and
checking the base an adapter belongs to (its name and a fingerprint of its weights), and the frozen ``ref``
adapter a later stage (DPO, PPO) measures its KL against."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from halluc_rl.registry import resolve_model_path


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
    if not tied_head(model):
        rows[_module_name(model, model.get_output_embeddings())] = [backtrack_id]
    config = LoraConfig(r=lora_args.lora_r, lora_alpha=lora_args.lora_alpha, lora_dropout=lora_args.lora_dropout,
                        target_modules=targets, trainable_token_indices=rows, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def base_model_name(path: str | Path) -> str | None:
    """The base model a saved adapter was trained from (None when ``path`` is a full model)."""
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
