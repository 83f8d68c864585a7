"""The data layer: problems and the prompt format, grading, backtrack examples, the collator and the curriculum.

* :mod:`~halluc_rl.data.grading` - extract, normalise and compare final answers (GSM8K style);
* :mod:`~halluc_rl.data.problems` - the :class:`Problem` type and the prompt format;
* :mod:`~halluc_rl.data.gsm8k`, :mod:`~halluc_rl.data.arithmetic` - GSM8K, the offline :class:`ArithmeticTask`;
* :mod:`~halluc_rl.data.deps`, :mod:`~halluc_rl.data.deps_check`, :mod:`~halluc_rl.data.deps_errors` - the offline
  ``deps`` task (:class:`DepsTask`), its checker (any valid order) and its training errors (:class:`DepsErrors`);
* :mod:`~halluc_rl.data.tasks` - the task registry and loader (and reasoning-gym), re-exporting the three above;
* :mod:`~halluc_rl.data.examples` - backtrack examples and their spans;
* :mod:`~halluc_rl.data.vocabulary` - token classes of a vocabulary (digits, operators, newlines, special tokens);
* :mod:`~halluc_rl.data.errors` - error sources: random, plausible and self-generated errors;
* :mod:`~halluc_rl.data.collator` - :class:`MaskedErrorCollator` (masked errors, hard attention, rewound positions);
* :mod:`~halluc_rl.data.curriculum` - caps on errors per example that grow over training.

Names are re-exported lazily: importing one module (say, grading) does not import the others (nor transformers).
"""

from __future__ import annotations

from importlib import import_module

_EXPORTS: dict[str, str] = {
    **dict.fromkeys(["evaluate", "extract_answer", "extract_hash_answer", "normalize_number", "reward"], "grading"),
    **dict.fromkeys(["Problem", "encode_problem", "format_prompt", "format_solution"], "problems"),
    "load_gsm8k": "gsm8k",
    "ArithmeticTask": "arithmetic",
    "DepsTask": "deps",
    **dict.fromkeys(["DepsVerdict", "check_solution"], "deps_check"),
    "DepsErrors": "deps_errors",
    "load_reasoning_gym": "tasks",
    **dict.fromkeys(["BacktrackExample", "assemble_example"], "examples"),
    **dict.fromkeys(["ErrorSource", "PlausibleErrors", "RandomTokenErrors", "SelfGeneratedErrors", "build_examples",
                     "divergent_spans"], "errors"),
    "MaskedErrorCollator": "collator",
    **dict.fromkeys(["Curriculum", "CurriculumCallback", "CurriculumDataset"], "curriculum"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    """Import the module that defines ``name`` on first use."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
