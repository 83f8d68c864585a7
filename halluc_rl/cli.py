"""The ``halluc-rl`` command line: one subcommand per stage; each lives in its own module and loads lazily."""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    # name: (module with a `main(argv)` function, one-line help)
    "demo": ("halluc_rl.agents.demo", "the whole pipeline on the embedded tiny model, offline: SFT, DPO, PPO and a control arm, "
             "each stage evaluated"),
    "pretrain": ("halluc_rl.agents.pretrain", "train the embedded tiny model from scratch on the offline task"),
    "sft": ("halluc_rl.agents.sft", "masked-error SFT of a (LoRA) policy: the warm start"),
    "dpo": ("halluc_rl.agents.dpo", "token-level DPO at the policy's own error points (after SFT)"),
    "ppo": ("halluc_rl.agents.ppo", "PPO on the backtrack MDP: process rewards, gae/mc/group advantages"),
    "grpo": ("halluc_rl.agents.grpo", "GRPO (TRL) on action streams, log-probs from the shared scorer"),
    "eval": ("halluc_rl.agents.evaluate", "evaluate a saved policy with and without backtracking"),
    "prm": ("halluc_rl.agents.prm", "train a process reward model on step labels (`prm eval`: compare PRMs)"),
    "models": ("halluc_rl.agents.models", "fetch pretrained models once and cache them for offline use: list, get, convert"),
}


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``halluc-rl <subcommand> [args]`` to the subcommand's ``main``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        width = max(map(len, SUBCOMMANDS))
        lines = [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
        print("usage: halluc-rl <subcommand> [options]\n\nsubcommands:\n" + "\n".join(lines))
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"halluc-rl: unknown subcommand {name!r}; choose one of {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
