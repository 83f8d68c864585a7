"""The one builder of an RL command's rewards: the outcome grader, the process reward of :class:`RewardArgs` in the
form asked for, and the backtrack cost, as a :class:`~halluc_rl.rewards.RewardMixer` (PPO and GRPO both call it)."""

from __future__ import annotations

from halluc_rl.args import RewardArgs
from halluc_rl.labels import step_token_ids
from halluc_rl.modeling import load_policy
from halluc_rl.rewards import (
    HFProcessReward,
    ImplicitProcessReward,
    OracleProcessReward,
    RewardMixer,
    RuleGrader,
    Shaping,
)


def build_rewards(args: RewardArgs, tokenizer) -> RewardMixer:
    """The rewards ``args`` configure, on the policy's ``tokenizer``; the process reward is named ``process``."""
    rewards: list = [RuleGrader()]
    mode = "delta" if args.process_form == "delta" else "raw"
    if args.process_reward == "oracle":
        rewards.append((OracleProcessReward(tokenizer, name="process", mode=mode), args.process_weight))
    elif args.process_reward == "prm":
        prm = HFProcessReward.from_pretrained(args.prm_path, tokenizer, name="process", mode=mode,
                                              step_token_ids=step_token_ids(tokenizer))
        rewards.append((prm, args.process_weight))
    elif args.process_reward == "implicit":  # a frozen policy of its own: its adapter on and off
        policy, _, _ = load_policy(args.prm_path)
        rewards.append((ImplicitProcessReward(policy, args.implicit_beta, name="process"), args.process_weight))
    return RewardMixer(rewards, Shaping(backtrack_cost=args.backtrack_cost))
