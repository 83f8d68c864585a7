"""A policy's backtrack settings: its backtrack token id, its head and its semantics (what a backspace leaves in
the model's context, :data:`halluc_rl.backtrack.SEMANTICS`), kept on ``model.config``, their one home. Everything
that generates, scores or trains a policy reads them here; every saved copy writes them (``config.json``). Nothing
here loads weights."""

from __future__ import annotations

import json
from pathlib import Path

from halluc_rl.backtrack import DEFAULT_SEMANTICS, check_semantics
from halluc_rl.losses import check_head


def set_policy_backtrack(model, backtrack_id: int, head: str | None = None, semantics: str | None = None) -> None:
    """Record a policy's backtrack settings on ``model.config``, their one home (saved with every copy).

    ``head`` None keeps a head already recorded, else ``softmax``; ``semantics`` None keeps one already recorded
    (else none is recorded: the policy has not been trained in either yet). A PEFT model's ``config`` is its
    base's, so the settings travel with the base config whatever wraps it.
    """
    config = model.config
    config.backtrack_token_id = int(backtrack_id)
    config.backtrack_head = check_head(head or getattr(config, "backtrack_head", None) or "softmax")
    if semantics is not None:
        config.backtrack_semantics = check_semantics(semantics)


def recorded_semantics(model) -> str | None:
    """The semantics a policy was trained in, as recorded on ``model.config`` (None: none recorded yet)."""
    return getattr(getattr(model, "config", None), "backtrack_semantics", None)


def policy_semantics(model, semantics: str | None = None, override: bool = False) -> str:
    """The semantics to run a policy in: its recorded one (``rewind`` when none is recorded), or ``semantics``.

    Asking for a semantics other than the recorded one is refused with a one-line ``ValueError`` unless
    ``override`` is set: a policy trained to backtrack in one semantics acts differently in the other.
    """
    recorded = recorded_semantics(getattr(model, "module", model))
    if semantics is None:
        return recorded or DEFAULT_SEMANTICS
    semantics = check_semantics(semantics)
    if recorded is not None and semantics != recorded and not override:
        raise ValueError(f"semantics: the policy was trained in {recorded!r}, not {semantics!r}; drop --semantics, "
                         f"or pass --override_semantics to run it in {semantics!r} anyway")
    return semantics


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


def use_semantics(model, semantics: str | None = None, override: bool = False) -> str:
    """Resolve the semantics to run a policy in (:func:`policy_semantics`) and record it on ``model.config``, so
    that everything downstream (generation, the scorer, a saved copy) runs and records it. Returns it."""
    semantics = policy_semantics(model, semantics, override)
    config = getattr(model, "module", model).config
    config.backtrack_semantics = semantics
    return semantics


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


def saved_backtrack_settings(path: Path) -> dict:
    """The backtrack settings recorded in a saved policy's ``config.json`` ({} when it records none)."""
    file = path / "config.json"
    if not file.exists():
        return {}
    data = json.loads(file.read_text())
    keys = ("backtrack_token_id", "backtrack_head", "backtrack_semantics")
    return {k: data[k] for k in keys if data.get(k) is not None}
