"""Config flow shared by every command: dataclass defaults, then a YAML file (``--config``), then CLI overrides.

Parsing is TRL's :class:`trl.TrlParser` (YAML read with ``yaml.safe_load``; unknown keys rejected by name). Model,
tokenizer and LoRA options live in :class:`ModelArgs` and :class:`LoraArgs`, shared by all trainers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ModelArgs:
    """Which model (and its tokenizer, saved beside it) to load, and how.

    ``trust_remote_code`` is TRL's own config field (``SFTConfig.trust_remote_code``, off by default), so it is
    not repeated here.
    """

    model_name_or_path: str = field(
        default="tiny",
        metadata={"help": "Hub id, local path (a folder, or a .gguf file), 'tiny' (the embedded model), or a model "
                          "fetched with `halluc-rl models get NAME` (e.g. smollm2-135m; see `halluc-rl models list`)."},
    )
    dtype: str = field(default="float32", metadata={"help": "float32, bfloat16, float16 or auto."})
    revision: str | None = field(default=None, metadata={"help": "Hub revision (branch, tag or commit)."})
    gguf_file: str | None = field(
        default=None,
        metadata={"help": "A llama.cpp GGUF file to load, inside model_name_or_path's folder (or Hub repo); it is "
                          "dequantised to dtype. Needs `pip install 'halluc-rl[gguf]'`. Convert it once with "
                          "`halluc-rl models convert` to skip the conversion on every load."},
    )


@dataclass
class RunArgs:
    """How a training run treats its output folder (shared by every trainer)."""

    resume: bool = field(default=True, metadata={
        "help": "Resume from the newest complete checkpoint in output_dir when there is one (false: start afresh)."})
    allow_config_change: bool = field(default=False, metadata={
        "help": "Let a resumed run continue under a config that differs from the one saved in output_dir."})


@dataclass
class LoraArgs:
    """PEFT LoRA settings (``use_lora: false`` trains every weight)."""

    use_lora: bool = field(default=True, metadata={"help": "Train a LoRA adapter (true) or fine-tune every weight."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        metadata={"help": "Module names that get LoRA adapters."},
    )


class PrecisionDefaults:
    """Mixed into TRL configs: ``bf16`` left unset means on where a CUDA GPU supports it and off elsewhere.

    TRL turns bf16 on by default, which on a CPU autocasts every step to bf16: slower there, inexact against the
    fp32 rollouts the RL trainers compare with, and an error ("doesn't support bf16/gpu") on a CPU machine unless
    ``use_cpu`` is set. An explicit ``bf16: true`` is kept.
    """

    def __post_init__(self) -> None:
        if self.bf16 is None and not self.fp16:
            import torch

            self.bf16 = bool(not self.use_cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        super().__post_init__()


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
    parser = TrlParser(tuple(types), **kwargs)
    return parser.parse_args_and_config(list(argv) if argv is not None else None)


def save_config(path: str | Path, *configs) -> Path:
    """Write the resolved config (every dataclass, merged) as YAML next to a run's outputs, atomically."""
    import yaml

    from halluc_rl.runs import atomic_write_text, resolved_config

    return atomic_write_text(path, yaml.safe_dump(resolved_config(*configs), sort_keys=True))
