"""Runs that never lie and never lose work: the machinery every trainer and command shares.

* **Bad input** is a :class:`UsageError`: :func:`cli` prints it as one line naming the field, the value and the
  fix, and exits with status 2. :func:`parse_cli` turns config-file problems into such errors and checks every
  field's type (YAML values bypass argparse's conversion, so ``num_train_problems: 2.5`` or
  ``lora_target_modules: q_proj`` would otherwise slip through).
* **Nothing non-finite is saved or reported as success**: :class:`SafeTrainerMixin` stops a Hugging Face trainer
  on a non-finite loss or gradient norm (before the optimiser applies it) with a :class:`NonFiniteError` naming
  the step, and refuses to save non-finite weights. :func:`cli` exits with status 3 on it.
* **Writes are atomic**: files are written aside and renamed (:func:`atomic_write_text`); checkpoints are written
  into a hidden staging folder and renamed into place, so a kill at any moment leaves either a complete
  ``checkpoint-N`` or none.
* **Resume is safe**: :func:`resume_checkpoint` picks the newest *complete* checkpoint and says which ones it
  skipped and why; :func:`check_resume_config` refuses to continue a run under a changed config, naming the keys.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import torch

# ----------------------------------------------------------------------------------------------------------------
# Errors and the command-line wrapper
# ----------------------------------------------------------------------------------------------------------------


class UsageError(ValueError):
    """Bad input: the message is one line naming the problem and the fix."""


class NonFiniteError(RuntimeError):
    """A loss, gradient or weight became non-finite: the run stops and nothing non-finite is saved."""


def cli(prog: str, main: Callable[[], int | None]) -> int:
    """Run a command's ``main``: bad input exits 2 with one line, a non-finite run exits 3 with one line."""
    try:
        return int(main() or 0)
    except UsageError as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 2
    except NonFiniteError as err:
        print(f"{prog}: stopped: {err}", file=sys.stderr)
        return 3


def parse_cli(types_: Sequence[type], argv: Sequence[str] | None, prog: str) -> tuple:
    """:func:`halluc_rl.config.parse_config` with every failure turned into one-line :class:`UsageError` s."""
    import yaml

    from halluc_rl.config import parse_config

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" in argv:
        index = argv.index("--config")
        path = Path(argv[index + 1]) if index + 1 < len(argv) else None
        if path is None or not path.is_file():
            raise UsageError(f"--config: no such file {str(path) if path else '(missing)'}; give a YAML file "
                             "(see configs/ for examples)")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise UsageError(f"--config: {path} is not valid YAML ({' '.join(str(err).split())[:160]})") from err
        if not isinstance(data, dict):
            raise UsageError(f"--config: {path} must hold a YAML mapping of option: value")
    try:
        parsed = parse_config(types_, argv, prog=prog)
    except ValueError as err:  # unknown keys, from the file or the command line
        raise UsageError(" ".join(str(err).split())) from err
    for obj in parsed:
        check_types(obj)
    return parsed


# ----------------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------------


def _matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` fits a simple type hint (int, float, bool, str, list[...], X | None, Literal); complex
    hints (dicts, enums, callables) are accepted as they are."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if origin is list:
        (inner,) = typing.get_args(hint) or (Any,)
        return isinstance(value, list) and all(_matches(v, inner) for v in value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return True


def _hint_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def check_types(obj: Any) -> None:
    """Raise a :class:`UsageError` for the first dataclass field whose value does not fit its type hint."""
    if not is_dataclass(obj):
        return
    try:
        hints = typing.get_type_hints(type(obj))
    except Exception:  # unresolvable annotations (third-party configs): nothing to check against
        return
    for f in fields(obj):
        if f.name not in hints or not f.init:
            continue
        value = getattr(obj, f.name)
        if not _matches(value, hints[f.name]):
            raise UsageError(f"{f.name}: expected {_hint_name(hints[f.name])}, got {value!r} "
                             f"({type(value).__name__}); fix it in the YAML file or on the command line")


def check_positive(obj: Any, *names: str, allow_zero: Iterable[str] = ()) -> None:
    """Refuse zero or negative values of the named fields (``allow_zero``: zero is allowed there)."""
    zero_ok = set(allow_zero)
    for name in names:
        value = getattr(obj, name)
        if value is None:
            continue
        if value < 0 or (value == 0 and name not in zero_ok):
            needs = ">= 0" if name in zero_ok else "> 0"
            raise UsageError(f"{name}: must be {needs}, got {value}")


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise UsageError(f"{name}: unknown value {value!r}; use one of {', '.join(map(str, choices))}")


def check_task(spec: str, field: str = "task") -> str:
    """Refuse an unknown task or bad task settings (``arithmetic:max_value=50``); returns the task's base name."""
    from halluc_rl.data.tasks import parse_task

    try:
        return parse_task(spec)[0]
    except ValueError as err:
        raise UsageError(str(err).replace("task:", f"{field}:", 1)) from err


def check_model_name(name: str, field: str = "model_name_or_path") -> None:
    """Refuse a model that cannot load before anything is written: a missing local path, or a Hub id offline."""
    from halluc_rl.modeling import KNOWN_MODELS, is_known_name, resolve_model_path

    if is_known_name(name):
        try:
            resolve_model_path(name)
        except FileNotFoundError as err:
            raise UsageError(f"{field}: {err}") from err
        return
    path = Path(name)
    if path.exists():
        if not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
            raise UsageError(f"{field}: {name} holds no model (no config.json); give a model directory")
        return
    hub_like = name.count("/") == 1 and not name.startswith((".", "/", "~")) and all(name.split("/"))
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    if not hub_like or offline:
        why = "no such directory" if not hub_like else "it looks like a Hub id, but HF_HUB_OFFLINE is set"
        raise UsageError(f"{field}: cannot load {name!r} ({why}); give a local model directory, a known name "
                         f"(tiny, {', '.join(KNOWN_MODELS)}), or a Hub id with network access")


# ----------------------------------------------------------------------------------------------------------------
# Atomic writes
# ----------------------------------------------------------------------------------------------------------------


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path`` and rename it into place (never a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, data: Any) -> Path:
    """Strict JSON (no NaN) written atomically."""
    return atomic_write_text(path, json.dumps(data, indent=2, allow_nan=False, default=str) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints and resume
# ----------------------------------------------------------------------------------------------------------------

WEIGHT_FILES: tuple[str, ...] = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json")


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
    import yaml

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


def resolved_config(*configs) -> dict:
    """Every dataclass merged into one plain dict (JSON types), as ``config.yaml`` stores it."""
    from dataclasses import asdict

    merged: dict = {}
    for cfg in configs:
        data = cfg.to_dict() if hasattr(cfg, "to_dict") else asdict(cfg) if is_dataclass(cfg) else dict(cfg)
        merged.update(json.loads(json.dumps(data, default=str)))
    return merged


def prepare_run_dir(output_dir: str | Path, configs: Sequence, *, resume: bool, allow_change: bool) -> str | None:
    """Validate the run folder against the configs, then (only then) write ``config.yaml``; return the checkpoint
    to resume from. Nothing is written when validation fails."""
    import yaml

    out = Path(output_dir)
    resolved = resolved_config(*configs)
    checkpoint = resume_checkpoint(out) if resume else None
    if resume:  # a folder holding another run (finished or not) is never overwritten under another config
        changed = check_resume_config(out / "config.yaml", resolved, allow_change)
        if changed:
            print(f"continuing under a changed config: {', '.join(changed)}")
    atomic_write_text(out / "config.yaml", yaml.safe_dump(resolved, sort_keys=True))
    return checkpoint


def finished_run(output_dir: str | Path, configs: Sequence) -> bool:
    """Whether ``output_dir`` holds a finished run (its weights and ``log_history.json``, written last) of exactly
    these configs: a pipeline can skip it."""
    import yaml

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


class SafeTrainerMixin:
    """For ``transformers.Trainer`` subclasses (TRL's included): stop on non-finite losses and gradient norms before
    the optimiser applies them, never save non-finite weights, save checkpoints atomically, and save the policy's
    model config (its backtrack settings) with every copy."""

    dead_steps_limit = 2
    """Consecutive steps with a zero gradient norm but a positive loss after which the run counts as diverged (a
    learning rate far too high saturates the network: the loss flattens and nothing trains any more)."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not is_finite(loss):
            raise NonFiniteError(f"step {self.state.global_step + 1}: the loss is {float(loss)}; nothing was saved "
                                 f"for this step (lower the learning rate, now {self.args.learning_rate})")
        self._last_loss = float(loss)
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        step = self.state.global_step + 1
        if not is_finite(norm):
            raise NonFiniteError(f"step {step}: the gradient norm is {float(norm)}; nothing was saved for this step "
                                 f"(lower the learning rate, now {self.args.learning_rate})")
        dead = norm is not None and float(norm) == 0.0 and getattr(self, "_last_loss", 0.0) > 0
        self._dead_steps = getattr(self, "_dead_steps", 0) + 1 if dead else 0
        if self._dead_steps >= self.dead_steps_limit:
            raise NonFiniteError(f"step {step}: the gradient norm has been 0 for {self._dead_steps} steps while the "
                                 f"loss is {self._last_loss:.4g}: the run diverged and no longer learns; nothing "
                                 f"was saved for these steps (lower the learning rate, now {self.args.learning_rate})")
        return norm

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        from halluc_rl.modeling import write_policy_config

        check_finite_weights(self.model, f"step {self.state.global_step}")
        output_dir = output_dir or self.args.output_dir
        model = self.accelerator.unwrap_model(self.model)
        if hasattr(model, "peft_config") and self.args.should_save:
            # The adapter alone: the backtrack rows travel as trainable tokens, and the base's embeddings are never
            # saved (PEFT's "auto" would look the base up by name, on the Hub for a name like "tiny").
            os.makedirs(output_dir, exist_ok=True)
            model.save_pretrained(output_dir, state_dict=state_dict, save_embedding_layers=False,
                                  selected_adapters=[model.active_adapter])  # not TRL's frozen "ref" copy
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
        elif not hasattr(model, "peft_config"):
            super()._save(output_dir, state_dict)
        if self.args.should_save:
            write_policy_config(self.model, output_dir)

    def _save_checkpoint(self, model, trial) -> None:
        """Write ``checkpoint-N`` into a hidden staging folder, then rename it into place (atomic)."""
        from transformers.trainer_utils import rotate_checkpoints

        run_dir = Path(self._get_output_dir(trial=trial))
        name = f"checkpoint-{self.state.global_step}"
        staging = run_dir / f".staging-{name}"
        if self.args.should_save and staging.exists():
            shutil.rmtree(staging)
        self.accelerator.wait_for_everyone()
        self._get_output_dir = lambda trial=None: str(staging)  # Trainer writes run_dir/checkpoint-N: redirect it
        try:
            super()._save_checkpoint(model, trial)
        finally:
            del self._get_output_dir
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            final = run_dir / name
            if final.exists():  # a resumed run saving the same step again
                shutil.rmtree(final)
            os.replace(staging / name, final)
            shutil.rmtree(staging)
            rotate_checkpoints(str(run_dir), self.args.save_total_limit, use_mtime=False)
        self.accelerator.wait_for_everyone()


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


def save_policy(trainer, output_dir: str | Path) -> None:
    """Save the trained policy into ``output_dir`` through a staging folder (:func:`publish`), so every file there
    is complete whatever happens, and nothing non-finite is saved."""
    staging = staging_dir(output_dir) if trainer.args.should_save else Path(output_dir) / ".staging-final"
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(staging))
    trainer.accelerator.wait_for_everyone()
    if trainer.args.should_save:
        publish(staging, output_dir)
    trainer.accelerator.wait_for_everyone()


def train_and_save(trainer, output_dir: str | Path, resume: str | None) -> None:
    """``trainer.train()`` (from ``resume``), then the policy and ``log_history.json``, atomically."""
    trainer.train(resume_from_checkpoint=resume)
    save_policy(trainer, output_dir)
    if trainer.is_world_process_zero():
        atomic_write_json(Path(output_dir) / "log_history.json", trainer.state.log_history)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints of custom training loops (PPO): the same layout and guarantees as the Trainer's
# ----------------------------------------------------------------------------------------------------------------


def save_model_files(model, tokenizer, folder: Path) -> None:
    """A policy's files: the active adapter alone (no base embeddings) or the full model, its config with the
    backtrack settings, and the tokenizer. Refuses non-finite weights."""
    from halluc_rl.modeling import write_policy_config

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


def run_training(script, model_args, configs: Sequence, config, build: Callable[[str | None], Any]):
    """The flow every Trainer-based command shares, after its validation: check the run folder against the configs
    and write ``config.yaml`` (only then), refuse a checkpoint of another base, ``build(resume)`` the trainer (a
    model that does not load, or too little data, is a usage error), train and save the policy atomically."""
    from halluc_rl.modeling import check_same_base

    resume = prepare_run_dir(config.output_dir, configs, resume=script.resume and not config.resume_from_checkpoint,
                             allow_change=script.allow_config_change) or config.resume_from_checkpoint
    if resume:
        check_same_base(resume, model_args.model_name_or_path)
    try:
        trainer = build(resume)
    except (OSError, ValueError) as err:
        if isinstance(err, (UsageError, NonFiniteError)):
            raise
        raise UsageError(" ".join(str(err).split())) from err
    train_and_save(trainer, config.output_dir, resume)
    return trainer
