"""Run folders and checkpoints that never lose work.

* **Resume is safe**: :func:`resume_checkpoint` picks the newest *complete* ``checkpoint-N`` and says which ones it
  skipped and why; :func:`check_resume_config` refuses to continue a run under a changed config, naming the keys;
  :func:`prepare_run_dir` writes ``config.yaml`` only once the folder has been checked, and replaces the one of a
  run that never got as far as a checkpoint (a command that failed after writing it does not block the corrected
  one).
* **One run per folder**: :func:`lock_run_dir` holds an OS lock on ``output_dir/.run.lock`` for the whole run, so
  a second command into the same folder is refused (naming the holder) instead of doing the work twice; the OS
  drops the lock when the process dies, even under ``kill -9``.
* **Saves are atomic**: a policy or checkpoint is written into a hidden staging folder and renamed into place
  (:func:`save_checkpoint`, :func:`publish`), so a kill at any moment leaves either a complete folder or none.
* **Nothing non-finite is saved** (:func:`check_finite_weights`).

Trainer-based commands get the same layout from :class:`halluc_rl.training.SafeTrainerMixin`; custom loops (PPO) call
:func:`save_checkpoint` / :func:`load_checkpoint` here.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import shutil
import socket
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from halluc_rl.atomic import atomic_write_text
from halluc_rl.config import NonFiniteError, UsageError, resolved_config
from halluc_rl.modeling import SAVED_WEIGHTS
from halluc_rl.policy import write_policy_config

WEIGHT_FILES: tuple[str, ...] = (*(safe for safe, _ in SAVED_WEIGHTS.values()), "model.safetensors.index.json")
"""The files that hold a saved policy's weights (safetensors: the adapter, the model, or a sharded model's index)."""


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete checkpoint (None when it is): the trainer state, weights and config."""
    state = path / "trainer_state.json"
    if not state.exists():
        return "no trainer_state.json (interrupted while saving)"
    try:
        step = json.loads(state.read_text()).get("global_step")
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "trainer_state.json is truncated"
    if str(step) != path.name.split("-")[-1]:
        return f"trainer_state.json says step {step}"
    if not any((path / f).exists() for f in WEIGHT_FILES):
        return "no weights"
    if not (path / "config.json").exists():
        return "no config.json (the policy's backtrack settings)"
    return None


def resume_checkpoint(output_dir: str | Path, announce: Callable[[str], None] = print) -> str | None:
    """The newest complete ``checkpoint-N`` under ``output_dir`` (None when there is none), announced in one line
    together with the incomplete ones it skipped."""
    found = sorted((p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and p.name[11:].isdigit()),
                   key=lambda p: int(p.name[11:]), reverse=True)
    skipped = []
    for path in found:
        problem = checkpoint_problem(path)
        if problem is None:
            note = f" (skipped {'; '.join(skipped)})" if skipped else ""
            announce(f"resuming from {path}{note}")
            return str(path)
        skipped.append(f"{path.name}: {problem}")
    if skipped:
        announce(f"no complete checkpoint to resume from (skipped {'; '.join(skipped)}); starting afresh")
    return None


IGNORED_ON_RESUME: frozenset[str] = frozenset({
    "resume", "resume_from_checkpoint", "allow_config_change", "logging_dir", "disable_tqdm", "report_to",
    "save_steps", "save_total_limit", "logging_steps", "max_steps", "num_train_epochs", "overwrite_output_dir",
})
"""Keys that may change when a run is resumed: where and how often it reports and saves, and how long it runs."""


def check_resume_config(saved_file: Path, resolved: dict, allow_change: bool) -> list[str]:
    """Refuse to resume a run whose saved config differs from ``resolved``, naming the keys (unless
    ``allow_change``). Returns the differing keys."""
    if not saved_file.exists():
        return []
    try:
        saved = yaml.safe_load(saved_file.read_text()) or {}
    except yaml.YAMLError as err:
        raise UsageError(f"{saved_file} is not valid YAML; move it away to start afresh ({err})") from err
    keys = sorted(k for k in set(saved) | set(resolved)
                  if k not in IGNORED_ON_RESUME and saved.get(k) != resolved.get(k))
    if keys and not allow_change:
        shown = ", ".join(f"{k}: {saved.get(k)!r} -> {resolved.get(k)!r}" for k in keys[:6])
        more = f" (+{len(keys) - 6} more)" if len(keys) > 6 else ""
        raise UsageError(f"{saved_file.parent} holds a run with another config ({shown}{more}); use another "
                         "output_dir, or pass --allow_config_change true to continue it under the new one")
    return keys


def started_run(output_dir: str | Path) -> bool:
    """Whether ``output_dir`` holds work of a run: a ``checkpoint-N`` folder, weights or ``log_history.json``. A
    folder with only a ``config.yaml`` (its command failed before the first checkpoint) holds none."""
    out = Path(output_dir)
    return (any(p.is_dir() and p.name[11:].isdigit() for p in out.glob("checkpoint-*"))
            or any((out / f).exists() for f in (*WEIGHT_FILES, "log_history.json")))


def prepare_run_dir(output_dir: str | Path, configs: Sequence, *, resume: bool, allow_change: bool,
                    announce: Callable[[str], None] = print) -> str | None:
    """Validate the run folder against the configs, then (only then) write ``config.yaml``; return the checkpoint
    to resume from. Nothing is written when validation fails. A folder whose ``config.yaml`` belongs to a run that
    left no work (:func:`started_run`) is treated as new: its config is replaced, said in one line."""
    out = Path(output_dir)
    resolved = resolved_config(*configs)
    checkpoint = resume_checkpoint(out, announce) if resume else None
    if resume and (out / "config.yaml").exists() and not started_run(out):
        announce(f"replacing {out / 'config.yaml'}: its run left no checkpoint, weights or log_history.json")
    elif resume:  # a folder holding another run (finished or not) is never overwritten under another config
        changed = check_resume_config(out / "config.yaml", resolved, allow_change)
        if changed:
            announce(f"continuing under a changed config: {', '.join(changed)}")
    atomic_write_text(out / "config.yaml", yaml.safe_dump(resolved, sort_keys=True))
    return checkpoint


LOCK_FILE = ".run.lock"
"""The file inside a run folder that :func:`lock_run_dir` locks; it holds the holder's pid, host, start time and
command (read only to name the holder)."""


@contextlib.contextmanager
def lock_run_dir(output_dir: str | Path, enabled: bool = True) -> Iterator[Path | None]:
    """Hold an exclusive, non-blocking ``flock`` on ``output_dir/.run.lock`` for the ``with`` block: two commands
    into one folder would do the work twice and interleave their logs. A second one gets a :class:`UsageError`
    naming the holder. The OS releases the lock when the process ends in any way (``kill -9`` included), so a lock
    is never stale. ``enabled=False`` (the other processes of a distributed run) takes none."""
    if not enabled:
        yield None
        return
    import fcntl

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = " ".join(path.read_text(errors="replace").split()) or "a process that has not said who it is"
            raise UsageError(f"{out} is in use by another run ({holder}); wait for it to end, or use another "
                             "output_dir") from err
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.write(fd, (f"pid {os.getpid()} on {socket.gethostname()}, started {started}, command: "
                      f"{' '.join(sys.argv)}\n").encode())
        yield path
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def finished_run(output_dir: str | Path, configs: Sequence) -> bool:
    """Whether ``output_dir`` holds a finished run (its weights and ``log_history.json``, written last) of exactly
    these configs: a pipeline can skip it."""
    out = Path(output_dir)
    if not (out / "log_history.json").exists() or not any((out / f).exists() for f in WEIGHT_FILES):
        return False
    saved = yaml.safe_load((out / "config.yaml").read_text()) if (out / "config.yaml").exists() else None
    resolved = resolved_config(*configs)
    return saved is not None and all(saved.get(k) == resolved.get(k) for k in set(saved) | set(resolved)
                                     if k not in IGNORED_ON_RESUME)


def check_finite_weights(model: torch.nn.Module, what: str) -> None:
    """Raise :class:`NonFiniteError` naming the first parameter that holds a NaN or an infinity."""
    for name, param in model.named_parameters():
        if not bool(torch.isfinite(param.detach()).all()):
            raise NonFiniteError(f"{what}: parameter {name} holds non-finite values")


def is_finite(value: float | torch.Tensor | None) -> bool:
    if value is None:
        return True
    return bool(torch.isfinite(value).all()) if isinstance(value, torch.Tensor) else math.isfinite(float(value))


def staging_dir(output_dir: str | Path) -> Path:
    """A fresh hidden folder inside ``output_dir`` to save into before :func:`publish`."""
    staging = Path(output_dir) / ".staging-final"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def publish(staging: Path, output_dir: str | Path) -> None:
    """Rename every file saved in ``staging`` into ``output_dir`` (each one arrives whole), then drop ``staging``."""
    out = Path(output_dir)
    for item in sorted(staging.iterdir()):
        target = out / item.name
        if item.is_dir() and target.exists():
            shutil.rmtree(target)
        os.replace(item, target)
    shutil.rmtree(staging)


def save_model_files(model, tokenizer, folder: Path) -> None:
    """A policy's files: the active adapter alone (no base embeddings) or the full model, its config with the
    backtrack settings, and the tokenizer. Refuses non-finite weights."""
    check_finite_weights(model, str(folder))
    if hasattr(model, "peft_config"):
        model.save_pretrained(folder, save_embedding_layers=False, selected_adapters=[model.active_adapter])
    else:
        model.save_pretrained(folder, safe_serialization=True)
    write_policy_config(model, folder)
    tokenizer.save_pretrained(folder)


def save_checkpoint(output_dir: str | Path, step: int, model, tokenizer, states: dict[str, dict], info: dict,
                    keep: int | None = None) -> Path:
    """``checkpoint-<step>``: the policy, ``<name>.pt`` state dicts (optimiser, value head...), and
    ``trainer_state.json`` (``global_step`` plus ``info``), staged and renamed into place; older ones beyond
    ``keep`` are removed."""
    run = Path(output_dir)
    final = run / f"checkpoint-{step}"
    staging = run / f".staging-{final.name}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    save_model_files(model, tokenizer, staging)
    for name, state in states.items():
        torch.save(state, staging / f"{name}.pt")
    (staging / "trainer_state.json").write_text(json.dumps({"global_step": step, **info}, default=str))
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    if keep:
        found = sorted((p for p in run.glob("checkpoint-*") if p.name[11:].isdigit()), key=lambda p: int(p.name[11:]))
        for old in found[:-keep]:
            shutil.rmtree(old)
    return final


def load_checkpoint(path: str | Path, model, states: dict[str, Any]) -> dict:
    """Load a :func:`save_checkpoint` folder into ``model`` and the objects of ``states`` (each with
    ``load_state_dict``); returns its ``trainer_state.json``."""
    from safetensors.torch import load_file

    path = Path(path)
    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(path / "adapter_model.safetensors"),
                                  adapter_name=model.active_adapter)
    else:
        model.load_state_dict(load_file(path / "model.safetensors"), strict=False)
    for name, target in states.items():
        target.load_state_dict(torch.load(path / f"{name}.pt", weights_only=True))
    return json.loads((path / "trainer_state.json").read_text())
