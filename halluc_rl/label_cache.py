"""The on-disk cache of step labels and the fingerprints that say what made it.

A cache is a ``datasets.Dataset`` folder with a record (:data:`RECORD_FILE`, made by
:func:`halluc_rl.labels.label_record`) of the policy (:func:`policy_fingerprint`), its tokenizer
(:func:`tokenizer_fingerprint`), the problems (:func:`problems_fingerprint`) and the label settings. A cache made
otherwise is refused in one line naming what differs (:func:`record_differences`), never silently reused; a new one
is saved atomically (:func:`save_label_cache`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from halluc_rl.adapters import base_fingerprint
from halluc_rl.data.problems import Problem
from halluc_rl.policy import policy_backtrack

CACHE_VERSION = 1
RECORD_FILE = "halluc_rl_labels.json"
"""The record of what made a label cache, saved inside its folder."""


def _hash_tensors(tensors: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        value = tensors[name].detach().to("cpu")
        digest.update(f"{name}:{tuple(value.shape)}:{value.dtype}".encode())
        digest.update(value.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _peft_base_fingerprint(model) -> str:
    """:func:`halluc_rl.adapters.base_fingerprint`'s rule (the first and last matrices, rounded to bf16) over a
    PEFT model's base weights: every parameter not stored under an adapter's name, ``.base_layer`` dropped from
    the names. The same for the same base whether the adapter was just trained or loaded from disk."""
    adapters = tuple(model.peft_config)

    def is_adapter(name: str) -> bool:
        return any(f".{a}." in name or name.endswith(f".{a}") for a in adapters)

    matrices = [(n.replace(".base_layer", ""), p) for n, p in model.named_parameters() if p.ndim == 2 and not
                is_adapter(n)]
    digest = hashlib.sha256()
    for name, param in dict([matrices[0], matrices[-1]]).items():
        digest.update(name.encode())
        digest.update(param.detach().to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]


def policy_fingerprint(model) -> dict[str, Any]:
    """What identifies a policy: its base weights, the weights trained on top, and its backtrack settings.

    A PEFT policy: a fingerprint of its base weights (:func:`_peft_base_fingerprint`) and a hash of its adapter's
    weights (``get_peft_model_state_dict``: LoRA, the trainable backtrack rows, saved modules). A full model:
    :func:`halluc_rl.adapters.base_fingerprint` and a hash of every weight.
    """
    bt, head = policy_backtrack(model)
    record: dict[str, Any] = {"backtrack_token_id": bt, "backtrack_head": head}
    from peft import PeftModel, get_peft_model_state_dict

    if isinstance(model, PeftModel):
        record["base"] = _peft_base_fingerprint(model)
        record["adapter"] = _hash_tensors(get_peft_model_state_dict(model))
    else:
        record["base"] = base_fingerprint(model)
        record["weights"] = _hash_tensors(dict(model.named_parameters()))
    return record


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the vocabulary and the EOS id (what token ids mean)."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return hashlib.sha256(json.dumps([vocab, tokenizer.eos_token_id]).encode()).hexdigest()[:16]


def problems_fingerprint(problems: Sequence[Problem]) -> str:
    """A hash of the problems' questions, solutions and answers: the labels are only valid for these problems."""
    return hashlib.sha256(json.dumps([[p.question, p.solution, p.answer] for p in problems]).encode()).hexdigest()[:16]


def _flatten(record: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in record.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


_RECORD_ORDER = ("version", "policy", "tokenizer", "task", "settings")


def record_differences(saved: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """``key: saved vs wanted`` for every recorded value that differs (the policy first, then the task...)."""
    a, b = _flatten(saved), _flatten(wanted)

    def order(key: str) -> tuple[int, str]:
        top = key.split(".")[0]
        return (_RECORD_ORDER.index(top) if top in _RECORD_ORDER else len(_RECORD_ORDER), key)

    return [f"{key}: {a.get(key)!r} vs {b.get(key)!r}" for key in sorted(set(a) | set(b), key=order)
            if a.get(key) != b.get(key)]


def load_label_cache(path: str | Path, record: Mapping[str, Any]):
    """The cached labels at ``path`` if they were made as ``record`` says; None when there is no cache there.

    A cache made otherwise is refused with a :class:`~halluc_rl.config.UsageError` naming the differences.
    """
    import datasets

    from halluc_rl.config import UsageError

    path = Path(path)
    if not path.exists():
        return None
    file = path / RECORD_FILE
    if not file.exists():
        raise UsageError(f"{path} exists but is not a label cache (no {RECORD_FILE}); give another path or move it")
    saved = json.loads(file.read_text())
    diff = record_differences(saved, record)
    if diff:
        more = f" (+{len(diff) - 4} more)" if len(diff) > 4 else ""
        raise UsageError(f"label cache {path} was made by another policy, task or setting ({'; '.join(diff[:4])}"
                         f"{more}: saved vs now); delete it or give another label cache path")
    return datasets.load_from_disk(str(path))


def save_label_cache(dataset, path: str | Path, record: Mapping[str, Any]) -> Path:
    """Save ``dataset`` and its record into a temporary folder beside ``path``, then rename it into place.

    Raises ``FileExistsError`` when another process put a cache at ``path`` first (this one is then dropped).
    """
    from halluc_rl.atomic import atomic_write_json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        dataset.save_to_disk(str(tmp))
        atomic_write_json(tmp / RECORD_FILE, dict(record))
        try:
            os.replace(tmp, path)
        except OSError as err:
            if path.exists():
                raise FileExistsError(f"{path} appeared while the labels were being made") from err
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
