"""The data layer: problems and the prompt format, grading, backtrack examples, the collator and the curriculum.

* :mod:`~halluc_rl.data.grading` - extract, normalise and compare final answers (GSM8K style);
* :mod:`~halluc_rl.data.tasks` - GSM8K, the offline :class:`ArithmeticTask`, reasoning-gym, and the prompt format;
* :mod:`~halluc_rl.data.errors` - backtrack examples from random, plausible and self-generated errors;
* :mod:`~halluc_rl.data.collator` - :class:`MaskedErrorCollator` (masked errors, hard attention, rewound positions);
* :mod:`~halluc_rl.data.curriculum` - caps on errors per example that grow over training.

Names are re-exported lazily: importing one module (say, grading) does not import the others (nor transformers).
"""

from __future__ import annotations

from importlib import import_module

_EXPORTS: dict[str, str] = {
    **dict.fromkeys(["evaluate", "extract_answer", "extract_hash_answer", "normalize_number", "reward"], "grading"),
    **dict.fromkeys(["ArithmeticTask", "Problem", "encode_problem", "format_prompt", "format_solution",
                     "load_gsm8k", "load_reasoning_gym"], "tasks"),
    **dict.fromkeys(["BacktrackExample", "ErrorSource", "PlausibleErrors", "RandomTokenErrors",
                     "SelfGeneratedErrors", "assemble_example", "build_examples", "divergent_spans"], "errors"),
    "MaskedErrorCollator": "collator",
    **dict.fromkeys(["Curriculum", "CurriculumCallback", "CurriculumDataset"], "curriculum"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    """Import the module that defines ``name`` on first use."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
