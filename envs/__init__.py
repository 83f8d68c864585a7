"""Gymnasium environments of backtrack-aware token generation (installed as ``halluc_rl.envs``)."""
