"""The house's layers: every module imports only modules of its own layer or below (function-level imports too).

The table is the map of the house (README: "The house"). A new module must be placed in it, or this test fails.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"halluc_rl": "halluc_rl", "envs": "halluc_rl.envs", "agents": "halluc_rl.agents"}

LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("core", ("halluc_rl.backtrack", "halluc_rl.losses", "halluc_rl.atomic", "halluc_rl.distributed",
              "halluc_rl.policy", "halluc_rl.data.grading")),
    ("engine", ("halluc_rl.cache", "halluc_rl.decoding", "halluc_rl.engine", "halluc_rl.generation",
                "halluc_rl.scoring")),
    ("models", ("halluc_rl.registry", "halluc_rl.tiny", "halluc_rl.adapters", "halluc_rl.modeling")),
    ("data", ("halluc_rl.data",)),
    ("runs", ("halluc_rl.args", "halluc_rl.config", "halluc_rl.checkpoints", "halluc_rl.training")),
    ("rl", ("halluc_rl.rewards", "halluc_rl.mixers", "halluc_rl.rollout", "halluc_rl.values", "halluc_rl.labels",
            "halluc_rl.label_cache", "halluc_rl.prm_metrics", "halluc_rl.pairs", "halluc_rl.evaluation",
            "halluc_rl.reporting")),
    ("apps", ("halluc_rl.envs", "halluc_rl.agents")),
    ("entry", ("halluc_rl.cli", "halluc_rl.__main__")),
)
"""Lowest first. A module belongs to the entry with the longest matching prefix (``halluc_rl.data`` covers every
module of the data package)."""


def layer_of(module: str) -> int | None:
    best = None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (index, len(prefix))
    return None if best is None else best[0]


def modules() -> dict[str, Path]:
    found = {}
    for folder, dotted in PACKAGES.items():
        for file in sorted((ROOT / folder).rglob("*.py")):
            if "assets" in file.parts:
                continue
            parts = [p for p in file.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
            found[".".join([dotted, *parts])] = file
    return found


def first_party_imports(name: str, file: Path, known: set[str]) -> set[str]:
    """Every first-party module ``name`` imports, anywhere in the file (``from x import y`` resolves to ``x.y`` when
    ``y`` is a module)."""
    found: set[str] = set()
    is_package = file.name == "__init__.py"
    for node in ast.walk(ast.parse(file.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".") if is_package else name.split(".")[:-1]
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        found.update(t for t in targets if t.split(".")[0] == "halluc_rl" and t != "halluc_rl")
    return found


def test_every_module_has_a_layer():
    missing = [m for m in modules() if m != "halluc_rl" and layer_of(m) is None]
    assert not missing, f"place these modules in tests/test_layers.py's LAYERS: {missing}"


def test_no_module_imports_a_layer_above_its_own():
    known = set(modules())
    upward = []
    for name, file in modules().items():
        if name == "halluc_rl":
            continue
        mine = layer_of(name)
        for target in first_party_imports(name, file, known):
            theirs = layer_of(target)
            if theirs is not None and theirs > mine:
                upward.append(f"{name} ({LAYERS[mine][0]}) imports {target} ({LAYERS[theirs][0]})")
    assert not upward, "imports that run back up:\n" + "\n".join(sorted(upward))


@pytest.mark.parametrize("module, expected", [("halluc_rl.data.tasks", "data"), ("halluc_rl.agents.ppo", "apps"),
                                              ("halluc_rl.backtrack", "core"), ("halluc_rl.config", "runs")])
def test_layer_of(module, expected):
    assert LAYERS[layer_of(module)][0] == expected


def test_the_check_sees_an_upward_import(tmp_path):
    """The check itself works: a core module importing the env would be reported."""
    file = tmp_path / "backtrack.py"
    file.write_text("def f():\n    from halluc_rl.envs.backtrack_env import BacktrackEnv\n")
    known = set(modules())
    found = first_party_imports("halluc_rl.backtrack", file, known)
    assert "halluc_rl.envs.backtrack_env" in found
    assert layer_of("halluc_rl.envs.backtrack_env") > layer_of("halluc_rl.backtrack")
