"""halluc-rl: teach language models to fix their own mistakes while they write.

A model gets one extra token, ``<|BACKTRACK|>``, which deletes the previous token of its answer; generation goes on
from the shortened text with the KV cache rewound, never re-encoded.
"""

from halluc_rl.backtrack import BACKTRACK_TOKEN, BacktrackState, apply_actions, backtrack_token_id

__version__ = "0.1.0"

__all__ = ["BACKTRACK_TOKEN", "BacktrackState", "apply_actions", "backtrack_token_id", "__version__"]
