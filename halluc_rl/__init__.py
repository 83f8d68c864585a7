"""halluc-rl: teach language models to fix their own mistakes while they write.

A model gets one extra token, ``<|BACKTRACK|>``, which deletes the previous token of its answer; generation goes on
from the shortened text with the KV cache rewound, never re-encoded.
"""

from gymnasium.envs.registration import register, registry

from halluc_rl.backtrack import BACKTRACK_TOKEN, BacktrackState, apply_actions, backtrack_token_id

__version__ = "0.1.0"

ENV_IDS: dict[str, dict] = {
    "Backtrack-GSM8K-v0": {"task": "gsm8k"},
    "Backtrack-Arithmetic-v0": {"task": "arithmetic"},
    "Backtrack-Deps-v0": {"task": "deps", "tokenizer": "tiny-deps"},
}
for _env_id, _kwargs in ENV_IDS.items():
    if _env_id not in registry:
        register(id=_env_id, entry_point="halluc_rl.envs.backtrack_env:BacktrackEnv", kwargs=_kwargs)

__all__ = ["BACKTRACK_TOKEN", "ENV_IDS", "BacktrackState", "apply_actions", "backtrack_token_id", "__version__"]
