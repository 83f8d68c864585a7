"""The command line, its one home: config parsing and validation, and the errors a command exits with.

* **Config flow** shared by every command: dataclass defaults, then a YAML file (``--config``), then CLI overrides.
  Parsing is TRL's :class:`trl.TrlParser` (YAML read with ``yaml.safe_load``; unknown keys rejected by name).
  The argument blocks (model, run folder, task, sampling, rewards, LoRA) live in :mod:`halluc_rl.args`.
* **Bad input** is a :class:`UsageError`: :func:`cli` prints it as one line naming the field, the value and the
  fix, and exits with status 2. :func:`parse_cli` turns config-file problems into such errors and checks every
  field's type (YAML values bypass argparse's conversion, so ``num_train_problems: 2.5`` or
  ``lora_target_modules: q_proj`` would otherwise slip through).
* **Nothing non-finite is reported as success**: a :class:`NonFiniteError` (a NaN loss, a dead gradient) exits
  with status 3 and one line naming the step.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import re
import sys
import tempfile
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from halluc_rl.args import (  # noqa: F401  (the blocks were defined here first: their old import path works)
    PROCESS_REWARDS,
    RENAMED,
    LoraArgs,
    ModelArgs,
    PrecisionDefaults,
    RewardArgs,
    RunArgs,
    SamplingArgs,
    TaskArgs,
)
from halluc_rl.atomic import atomic_write_text
from halluc_rl.data.tasks import GENERATOR_TASKS, ORACLE_TASKS, load_problems, parse_task
from halluc_rl.modeling import check_saved_model
from halluc_rl.policy import recorded_semantics, use_semantics
from halluc_rl.registry import KNOWN_MODELS, is_known_name, resolve_model_path


def parse_config(types: Sequence[type], argv: Sequence[str] | None = None, prog: str | None = None) -> tuple:
    """Instances of ``types`` from defaults, ``--config file.yaml`` and ``--key value`` overrides.

    ``prog`` names the command in ``--help`` (``halluc-rl sft``), whose usage line also lists ``--config``.
    """
    from trl import TrlParser

    kwargs = {}
    if prog:
        kwargs = {"prog": prog, "usage": f"{prog} [--config FILE.yaml] [--option value ...]",
                  "description": "Options come from the defaults below, then --config FILE.yaml (unknown keys are "
                                 "rejected), then --option value on the command line."}
    argv = list(sys.argv[1:] if argv is None else argv)
    help_all = "--help-all" in argv
    if help_all:
        argv = ["--help" if a == "--help-all" else a for a in argv]
    parser = TrlParser(tuple(types), **kwargs)
    if prog:
        group_help(parser, types, prog, show_inherited=help_all)
    return parser.parse_args_and_config(argv)


HELP_GROUPS: dict[str, str] = {"ModelArgs": "model and tokenizer", "LoraArgs": "LoRA adapter",
                               "RunArgs": "run folder"}
"""Headers of the shared blocks in ``--help`` (the rest of a command's own options go under "options of PROG")."""

KEY_INHERITED: tuple[str, ...] = ("output_dir", "learning_rate", "num_train_epochs", "max_steps",
                                  "per_device_train_batch_size", "gradient_accumulation_steps", "seed", "beta",
                                  "save_steps", "logging_steps", "report_to", "use_cpu", "bf16")
"""The TRL/transformers options ``--help`` shows (under their own header); ``--help-all`` shows the rest."""


def _declaring_class(cls: type, name: str) -> type:
    """The class of ``cls``'s MRO that declares the dataclass field ``name`` (the most derived one)."""
    for klass in cls.__mro__:
        if name in klass.__dict__.get("__annotations__", {}):
            return klass
    return cls


def _is_project_class(cls: type) -> bool:
    return cls.__module__.split(".")[0] in ("halluc_rl", "agents")


def group_help(parser: argparse.ArgumentParser, types_: Sequence[type], prog: str, show_inherited: bool) -> None:
    """Arrange ``--help``: the command's own options first, then the shared blocks (model, LoRA), each under a
    header; the options inherited from TRL/transformers configs go under their own header with ``--help-all``
    and are hidden (counted, and named in the epilog) with ``--help``, which would otherwise run to ~1,000 lines.

    Only the help text changes: every option parses as before. ``--no_X`` says what it turns off instead of
    repeating ``--X``'s help.
    """
    owner: dict[str, str] = {}
    key = "training (TRL/transformers; --help-all lists all of their options)"
    for cls in types_:
        if not is_dataclass(cls):
            continue
        for f in fields(cls):
            klass = _declaring_class(cls, f.name)
            header = HELP_GROUPS.get(klass.__name__)
            if header is None:
                header = f"options of {prog}" if _is_project_class(klass) else "inherited TRL/transformers options"
            if header.startswith("inherited") and f.name in KEY_INHERITED:
                header = key
            owner.setdefault(f.name, header)
    inherited = "inherited TRL/transformers options"
    order = [f"options of {prog}", *HELP_GROUPS.values(), key, inherited]
    groups = {h: parser.add_argument_group(h if h != inherited or show_inherited else None) for h in order}
    hidden = 0
    for action in list(parser._optionals._group_actions):
        header = owner.get(action.dest)
        if header is None:
            continue
        if action.option_strings and action.option_strings[0].startswith("--no_") and action.const is False:
            action.help = f"Set {action.dest} to false (turns off --{action.dest}; see its help above)."
        parser._optionals._group_actions.remove(action)
        groups[header]._group_actions.append(action)
        if header == inherited and not show_inherited:
            action.help = argparse.SUPPRESS
            hidden += not action.option_strings[0].startswith("--no_")
    for group in groups.values():
        if not group._group_actions:
            parser._action_groups.remove(group)
    if hidden:
        parser.epilog = (f"{hidden} more options inherited from TRL/transformers (warmup_steps, "
                         f"lr_scheduler_type, max_grad_norm, save_strategy, ...) are not shown: `{prog} --help-all` lists them too.")


def save_config(path: str | Path, *configs) -> Path:
    """Write the resolved config (every dataclass, merged) as YAML next to a run's outputs, atomically."""
    return atomic_write_text(path, yaml.safe_dump(resolved_config(*configs), sort_keys=True))


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
    argv = list(sys.argv[1:] if argv is None else argv)
    known = {f.name for t in types_ if is_dataclass(t) for f in fields(t)}
    renames = {old: new for old, new in RENAMED.items() if new in known and old not in known}
    argv = _glue_negative_values([_renamed_flag(arg, renames) for arg in argv])
    with tempfile.TemporaryDirectory() as tmp:
        if "--config" in argv:
            index = argv.index("--config")
            argv[index + 1] = str(_read_config_file(argv[index + 1] if index + 1 < len(argv) else None, renames,
                                                    Path(tmp)))
        try:
            parsed = parse_config(types_, argv, prog=prog)
        except ValueError as err:  # unknown keys, from the file or the command line
            raise UsageError(_unknown_options(str(err), known, prog)) from err
    for obj in parsed:
        check_types(obj)
    return parsed


def _unknown_options(message: str, known: Iterable[str], prog: str) -> str:
    """TRL's "not used by the HfArgumentParser" / "add them to the dataclass" errors (written for developers) as one
    line naming each unknown option and the closest known one."""
    listed = re.search(r"\[(.*)\]", message)
    if not listed or not ("not used" in message or "Unknown arguments" in message):
        return " ".join(message.split())
    names = [n.lstrip("-").replace("-", "_") for n in re.findall(r"'(--?[^'=]+)", listed.group(1))]
    if not names:
        return " ".join(message.split())
    source = "--config file" if "config file" in message else "command line"
    parts = []
    for name in dict.fromkeys(names):
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
        parts.append(f"--{name}" + (f" (did you mean --{close[0]}?)" if close else ""))
    return (f"unknown option{'s' if len(parts) > 1 else ''} on the {source}: {', '.join(parts)}; "
            f"`{prog} --help` lists the options")


def _glue_negative_values(argv: list[str]) -> list[str]:
    """``--key -inf`` (or ``-1e-3``) as ``--key=-inf``: argparse reads a value that starts with ``-`` and is not a
    plain decimal (``-1``, ``-0.5``) as the next option, so ``--backtrack_bias -inf`` would fail."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and arg.startswith("-") and _is_number(arg):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _renamed_flag(arg: str, renames: dict[str, str]) -> str:
    """``--old_name[=value]`` (or ``--old-name``) as the option's new name."""
    if not arg.startswith("--"):
        return arg
    name, eq, value = arg[2:].partition("=")
    new = renames.get(name.replace("-", "_"))
    return f"--{new}{eq}{value}" if new else arg


def read_config_mapping(given: str | Path | None, field: str = "--config") -> dict:
    """The option: value mapping of a YAML config file (an empty file is no options), or a one-line
    :class:`UsageError` naming ``field`` when the file is missing, not YAML, or not a mapping."""
    path = Path(given) if given else None
    if path is None or not path.is_file():
        raise UsageError(f"{field}: no such file {str(path) if path else '(missing)'}; give a YAML file "
                         "(see configs/ for examples)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UsageError(f"{field}: {path} is not valid YAML ({' '.join(str(err).split())[:160]})") from err
    if data is not None and not isinstance(data, dict):
        raise UsageError(f"{field}: {path} must hold a YAML mapping of option: value")
    return data or {}


def _read_config_file(given: str | None, renames: dict[str, str], tmp: Path) -> Path:
    """Check a ``--config`` file (one line per problem); a file using renamed keys is read through a renamed copy."""
    data = read_config_mapping(given)
    path = Path(given)
    if not any(key in renames for key in data):
        return path
    clash = [f"{old} and {renames[old]}" for old in data if old in renames and renames[old] in data]
    if clash:
        raise UsageError(f"--config: {path} sets both {clash[0]} (the same option, renamed); keep "
                         f"{clash[0].split(' and ')[1]}")
    copy = tmp / path.name
    copy.write_text(yaml.safe_dump({renames.get(k, k): v for k, v in data.items()}, sort_keys=False))
    return copy


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
    """Raise a :class:`UsageError` for the first dataclass field whose value does not fit its type hint, or that
    holds a non-finite number (see :func:`check_finite`)."""
    if not is_dataclass(obj):
        return
    check_finite(obj)
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


ALLOW_INF: dict[str, str] = {"backtrack_bias": "-inf"}
"""The infinities a float field documents, by field name (space-separated): ``backtrack_bias: -inf`` means "never
backtrack" (the backtrack logit is masked), as the runs with backtracking off use internally. (Not field
metadata: HfArgumentParser passes metadata on to ``argparse.add_argument``.)"""
INF_MEANS: dict[str, str] = {"backtrack_bias": "-inf means never backtrack"}
"""What an allowed infinity means, for the error message."""


def check_finite(obj: Any) -> None:
    """Refuse NaN in every float field (lists too) of a parsed dataclass, TRL's configs included, and +/-inf unless
    the field documents it (:data:`ALLOW_INF`). argparse and YAML both read ``nan`` and ``inf`` as floats,
    and a NaN coefficient silently turns its term off (``x > 0`` is false) while a NaN is saved as the config."""
    for f in fields(obj):
        if not f.init:
            continue
        value = getattr(obj, f.name, None)
        items = value if isinstance(value, (list, tuple)) else [value]
        for item in items:
            if not isinstance(item, float) or math.isfinite(item):
                continue
            allowed = ALLOW_INF.get(f.name, "")
            if math.isnan(item) or str(item) not in allowed.split():
                also = f" ({allowed} is allowed: {INF_MEANS.get(f.name, allowed)})" if allowed else ""
                raise UsageError(f"{f.name}: must be a finite number, got {item}{also}; fix it in the YAML file or "
                                 "on the command line")


def check_output_dir(path: str | os.PathLike | None, field: str = "output_dir") -> None:
    """Refuse a run folder that is a file, or lies under one, before anything is written (every command that
    writes a run folder calls this in its validation)."""
    if path is None:
        return
    target = Path(path).expanduser()
    for part in (target, *target.parents):
        if part.exists() and not part.is_dir():
            where = "is a file" if part == target else f"lies under {part}, which is a file"
            raise UsageError(f"{field}: {path} {where}; give a folder (a new one, or a run folder of this command)")


def check_device(name: str, field: str = "device") -> None:
    """Refuse a device other than auto, cpu, cuda or cuda:N, and CUDA where there is none."""
    import torch

    available = torch.cuda.is_available()
    here = f"CUDA is available here ({torch.cuda.device_count()} device(s))" if available else \
        "CUDA is not available here"
    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if name in ("auto", "cpu"):
        return
    if match is None:
        raise UsageError(f"{field}: unknown device {name!r}; use auto, cpu, cuda or cuda:N ({here})")
    if not available or (match.group(1) is not None and int(match.group(1)) >= torch.cuda.device_count()):
        raise UsageError(f"{field}: {name} cannot be used: {here}; use auto or cpu"
                         + (f", or cuda:0 to cuda:{torch.cuda.device_count() - 1}" if available else ""))


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


def adopt_semantics(model, args) -> str:
    """Run ``model`` in ``args.semantics`` (:class:`~halluc_rl.args.SemanticsArgs`; None: the policy's own) and
    record it on its config (:func:`halluc_rl.policy.use_semantics`). A semantics the policy was not trained in
    is a one-line :class:`UsageError` unless ``args.override_semantics``."""
    recorded = recorded_semantics(getattr(model, "module", model))
    try:
        semantics = use_semantics(model, args.semantics, args.override_semantics)
    except ValueError as err:
        raise UsageError(str(err)) from err
    if recorded is not None and semantics != recorded:
        print(f"note: running a policy trained in the {recorded} semantics in {semantics} (--override_semantics); "
              f"it is saved as a {semantics} policy")
    return semantics


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise UsageError(f"{name}: unknown value {value!r}; use one of {', '.join(map(str, choices))}")


FILE_TASKS: tuple[str, ...] = ("gsm8k",)
"""The tasks that read ``data_files`` (the others make their problems)."""


def check_task_args(args: TaskArgs, num_problems: int | None = None, count_field: str = "num_train_problems",
                    split: str = "train") -> str:
    """Refuse bad task settings, a data file for a task that reads none, a missing or unreadable one (its
    ``split`` is read now: a broken line or an empty file is one line, not a traceback mid-run), or an endless task
    asked for all of its problems (``num_problems`` 0); returns the task's base name."""
    name = check_task(args.task)
    check_positive(args, "validation_size", allow_zero=("validation_size",))
    if name in GENERATOR_TASKS and num_problems == 0:
        raise UsageError(f"{count_field}: the {name} task is endless; give a number > 0")
    if args.data_files is not None and name not in FILE_TASKS:
        raise UsageError(f"data_files: the {name} task does not read files; drop data_files (only "
                         f"{', '.join(FILE_TASKS)} reads them)")
    if args.data_files is not None and not Path(args.data_files).exists():
        raise UsageError(f"data_files: no such file or directory {args.data_files}")
    if args.data_files is not None:
        try:
            load_problems(args.task, split, num_problems or 0, args.data_files, seed=args.task_seed,
                          validation_size=args.validation_size)
        except (ValueError, OSError) as err:
            raise UsageError(f"data_files: {' '.join(str(err).split())}") from err
    return name


def check_reward_args(args: RewardArgs, task: str) -> None:
    """Refuse an unknown process reward or form, negative weights, and a process reward that cannot be loaded."""
    check_choice("process_reward", args.process_reward, PROCESS_REWARDS)
    check_choice("process_form", args.process_form, ("delta", "min"))
    check_positive(args, "backtrack_cost", "process_weight", "implicit_beta", allow_zero=(
        "backtrack_cost", "process_weight"))
    if args.process_reward == "oracle" and check_task(task) not in ORACLE_TASKS:
        raise UsageError("process_reward: the oracle knows only the offline task's solutions; use prm on gsm8k")
    if args.process_reward in ("prm", "implicit"):
        if not (args.prm_path and Path(args.prm_path).is_dir()):
            raise UsageError(f"prm_path: give the PRM's (prm) or the policy's (implicit) directory for "
                             f"process_reward: {args.process_reward} (got {args.prm_path})")
        check_model_name(args.prm_path, "prm_path")


def check_task(spec: str, field: str = "task") -> str:
    """Refuse an unknown task or bad task settings (``arithmetic:max_value=50``); returns the task's base name."""
    try:
        return parse_task(spec)[0]
    except ValueError as err:
        raise UsageError(str(err).replace("task:", f"{field}:", 1)) from err


def check_model_name(name: str, field: str = "model_name_or_path") -> None:
    """Refuse a model that cannot load before anything is written: a missing local path, or a Hub id offline."""
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
        try:
            check_saved_model(path)
        except ValueError as err:
            raise UsageError(f"{field}: {err}") from err
        return
    hub_like = name.count("/") == 1 and not name.startswith((".", "/", "~")) and all(name.split("/"))
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    if not hub_like or offline:
        why = "no such directory" if not hub_like else "it looks like a Hub id, but HF_HUB_OFFLINE is set"
        raise UsageError(f"{field}: cannot load {name!r} ({why}); give a local model directory, a known name "
                         f"(tiny, {', '.join(KNOWN_MODELS)}), or a Hub id with network access")


def resolved_config(*configs) -> dict:
    """Every dataclass merged into one plain dict (JSON types), as ``config.yaml`` stores it."""
    merged: dict = {}
    for cfg in configs:
        data = cfg.to_dict() if hasattr(cfg, "to_dict") else asdict(cfg) if is_dataclass(cfg) else dict(cfg)
        merged.update(json.loads(json.dumps(data, default=str)))
    return merged
