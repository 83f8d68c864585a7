"""Config flow shared by every command: dataclass defaults, then a YAML file (``--config``), then CLI overrides.

Parsing is TRL's :class:`trl.TrlParser` (YAML read with ``yaml.safe_load``; unknown keys rejected by name). Model,
tokenizer and LoRA options live in :class:`ModelArgs` and :class:`LoraArgs`, shared by all trainers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
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


def parse_config(types: Sequence[type], argv: Sequence[str] | None = None) -> tuple:
    """Instances of ``types`` from defaults, ``--config file.yaml`` and ``--key value`` overrides."""
    from trl import TrlParser

    parser = TrlParser(tuple(types))
    return parser.parse_args_and_config(list(argv) if argv is not None else None)


def save_config(path: str | Path, *configs) -> Path:
    """Write the resolved config (every dataclass, merged) as YAML next to a run's outputs."""
    import yaml

    merged: dict = {}
    for cfg in configs:
        data = cfg.to_dict() if hasattr(cfg, "to_dict") else asdict(cfg) if is_dataclass(cfg) else dict(cfg)
        merged.update(json.loads(json.dumps(data, default=str)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(merged, sort_keys=True))
    return path
