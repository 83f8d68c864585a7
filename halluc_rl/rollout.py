"""Batched rollouts of a policy model over B episodes: what the RL trainers eat.

One call decodes B problems with batched forward passes and per-row cache rewinds (the generation engine), runs the
reward models in lock-step (process rewards follow every action with their own rewound caches), and lays
everything out as [B, S] tensors. The same actions through :class:`halluc_rl.envs.backtrack_env.BacktrackEnv` give
the same visible texts and rewards (tested).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from halluc_rl.data.tasks import Problem, encode_problem
from halluc_rl.generation import BacktrackGenerationConfig, BacktrackGenerationOutput, generate
from halluc_rl.rewards import IncrementalScorer, RewardMixer


@dataclass
class Rollout:
    """B episodes. ``[B, S]`` tensors, on the CPU, are aligned with actions; S is the longest episode."""

    problems: list[Problem]
    prompt_ids: list[list[int]]
    actions: torch.Tensor  # [B, S] action ids, -1 after the episode ended
    action_mask: torch.Tensor  # [B, S] true where an action was taken
    logprobs: torch.Tensor  # [B, S] log-prob of each action under the sampling policy
    rewards: torch.Tensor  # [B, S] total reward of each action (outcome rewards on the last one)
    reward_parts: dict[str, torch.Tensor]  # name -> [B, S], weighted; they sum to ``rewards``
    process_rewards: torch.Tensor  # [B, S] the process plug-ins' parts (weighted), zeros without any
    dones: torch.Tensor  # [B, S] true on each episode's last action
    values: torch.Tensor | None  # [B, S] value of the state before each action (when a value model is given)
    generation: BacktrackGenerationOutput

    @property
    def visible_ids(self) -> list[list[int]]:
        return self.generation.sequences

    @property
    def texts(self) -> list[str]:
        return self.generation.texts

    @property
    def returns(self) -> torch.Tensor:
        """[B] undiscounted episode returns."""
        return self.rewards.sum(1)


class _ValueFollower:
    """Records a value model's score of the state before every action (its cache follows the policy's)."""

    def __init__(self, model):
        self.scorer = IncrementalScorer(model, transform="identity", follows="policy")
        self.values: list[torch.Tensor] = []

    def on_prefill(self, input_ids, attention_mask):
        self.values = []
        self.scorer.start(input_ids, attention_mask)

    def on_step(self, event):
        self.values.append(self.scorer.current.clone().cpu())
        self.scorer.follow(event)


def rollout(
    model,
    tokenizer,
    problems: Sequence[Problem],
    rewards: RewardMixer | None = None,
    config: BacktrackGenerationConfig | None = None,
    *,
    value_model=None,
    prompt_ids: Sequence[Sequence[int]] | None = None,
    forced_actions: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    num_samples: int = 1,
    **overrides,
) -> Rollout:
    """Run ``model`` on ``problems`` and score every action: ``num_samples`` episodes per problem (a group, side
    by side: rows ``i*G .. i*G+G-1`` belong to problem ``i``), each group branched from one prefilled prompt.

    Prompts are encoded in the library's one prompt format unless ``prompt_ids`` gives them ready-made.
    """
    problems = list(problems)
    mixer = rewards or RewardMixer()
    if prompt_ids is None:
        prompts = [encode_problem(p, tokenizer)[0] for p in problems]
    else:
        prompts = [list(map(int, p)) for p in prompt_ids]
    problems = [p for p in problems for _ in range(num_samples)]
    mixer.set_problems(problems)
    callbacks: list = [mixer]
    value_follower = _ValueFollower(value_model) if value_model is not None else None
    if value_follower is not None:
        callbacks.append(value_follower)
    out = generate(model, tokenizer, prompts, config, forced_actions=forced_actions, generator=generator,
                   callbacks=callbacks, return_logprobs=True, num_branches=num_samples, **overrides)
    prompts = out.prompt_ids
    mask = out.action_mask.cpu()  # [B, S]; a Rollout's tensors live on the CPU whatever the model's device
    batch, steps = mask.shape
    last = (mask.sum(1) - 1).clamp(min=0)  # [B] index of each episode's last action
    dones = torch.zeros(batch, steps, dtype=torch.bool)
    dones[torch.arange(batch), last] = True
    parts: dict[str, torch.Tensor] = {}
    names = {name for step in mixer.steps for name in step}
    for name in sorted(names):
        columns = [step.get(name, torch.zeros(batch)) for step in mixer.steps]  # S x [B]
        parts[name] = torch.stack(columns, 1) * mask  # [B, S]
    for name, value in mixer.finish(out.texts, problems).items():
        part = parts.setdefault(name, torch.zeros(batch, steps))
        part[torch.arange(batch), last] += value
    total = sum(parts.values()) if parts else torch.zeros(batch, steps)
    values = torch.stack(value_follower.values, 1) * mask if value_follower is not None else None  # [B, S]
    process = process_part(mixer, parts, (batch, steps))  # [B, S]
    return Rollout(problems, prompts, actions=out.actions.cpu(), action_mask=mask,
                   logprobs=out.logprobs.cpu(), rewards=total, reward_parts=parts, process_rewards=process,
                   dones=dones & mask, values=values, generation=out)


def process_part(mixer: RewardMixer, parts: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
    """The process plug-ins' share of the rewards [B, S]: a copy of their part when there is one (the same
    bits as reading it back from ``parts``), their sum when there are several, zeros when there are none."""
    names = dict.fromkeys(reward.name for reward, _ in mixer.process)
    found = [parts[name] for name in names if name in parts]
    return found[0].clone() if len(found) == 1 else sum(found, torch.zeros(shape))
