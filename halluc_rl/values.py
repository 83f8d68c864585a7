"""Monte-Carlo values of states: K sampled continuations per state, branched from its cached prefix.

A *state* is a problem's prompt plus a response already written. :func:`mc_values` prefills every state once
(prompt and response in one forward), forks each row's KV cache into K rows
(:meth:`halluc_rl.cache.RewindableCache.fork`), lets the policy finish each branch (backtracks allowed, into the
written response too), grades every finished answer, and returns the success share per state. States are batched.

This is what VinePPO-style advantages (:func:`vine_advantages`), Math-Shepherd step labels and DPO error
points all need: exact values of intermediate states, affordable because a branch costs no re-encoding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from halluc_rl.backtrack import BacktrackState
from halluc_rl.data.grading import reward as grade
from halluc_rl.data.tasks import Problem, encode_problem
from halluc_rl.generation import BacktrackGenerationConfig, generate, row_generators
from halluc_rl.losses import segment_advantages


@dataclass
class MCEstimate:
    """Monte-Carlo estimates for N states with K branches each."""

    values: torch.Tensor  # [N] share of branches that succeeded
    successes: torch.Tensor  # [N, K] each branch's outcome reward
    sequences: list[list[list[int]]]  # [N][K] each branch's final visible response (the written part included)


def mc_values(
    model,
    tokenizer,
    problems: Sequence[Problem],
    responses: Sequence[Sequence[int]],
    k: int,
    config: BacktrackGenerationConfig | None = None,
    *,
    batch_size: int = 64,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    grader: Callable[[str, Problem], float] | None = None,
    prompts: Sequence[Sequence[int]] | None = None,
    **overrides,
) -> MCEstimate:
    """Value of each state (``problems[i]``'s prompt + ``responses[i]``) by ``k`` sampled continuations.

    ``config``/``overrides`` are the continuations' decoding options (sampling at temperature 1 by default; a
    branch gets ``max_new_tokens`` more actions). ``grader(text, problem) -> float`` scores a finished answer
    (default: the rule grader). ``batch_size`` counts states per batch (each batch decodes ``batch_size * k``
    rows). ``generator``: one for everything, or one per branch (``N * k``, state by state) for batch-invariant
    sampling.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1 branches, got {k}")
    if len(problems) != len(responses):
        raise ValueError(f"{len(problems)} problems for {len(responses)} responses")
    options = {"do_sample": True, **overrides}
    score = grader or (lambda text, problem: grade(text, problem.answer))
    prompts = [encode_problem(p, tokenizer)[0] for p in problems] if prompts is None else prompts
    values, successes, sequences = [], [], []
    for i in range(0, len(problems), batch_size):
        rows = slice(i, i + batch_size)
        gens = generator[i * k : (i + batch_size) * k] if isinstance(generator, (list, tuple)) else generator
        out = generate(model, tokenizer, list(prompts[rows]), config, responses=list(responses[rows]),
                       num_branches=k, generator=gens, **options)
        batch_problems = [p for p in problems[rows] for _ in range(k)]
        rewards = torch.tensor([score(t, p) for t, p in zip(out.texts, batch_problems)]).view(-1, k)  # [n, K]
        successes.append(rewards)
        values.append(rewards.mean(1))
        sequences += [out.sequences[j * k : (j + 1) * k] for j in range(rewards.shape[0])]
    return MCEstimate(torch.cat(values), torch.cat(successes), sequences)


def mc_states(ro, newline_ids: set[int], bt: int) -> tuple[torch.Tensor, list[tuple[int, int, list[int]]]]:
    """Where VinePPO estimates values in a rollout ``ro``: the states before the first action, after each
    line, and before and after every backtrack. Returns the boundary mask [B, S] and (row, action index, state)
    per state. A state is what generation goes on from (:func:`~halluc_rl.generation.generate`'s ``responses``):
    the visible prefix in ``rewind``, the action stream so far in ``retry``, where the deleted tokens stay in the
    context."""
    retry = ro.generation.semantics == "retry"
    boundaries = torch.zeros_like(ro.action_mask)  # [B, S]
    states = []
    for b in range(ro.actions.shape[0]):
        actions = ro.actions[b][ro.action_mask[b]].tolist()
        state = BacktrackState(bt)  # the visible text before action t
        for t, a in enumerate(actions):
            after = t > 0 and (actions[t - 1] == bt or actions[t - 1] in newline_ids)
            if t == 0 or a == bt or after:
                boundaries[b, t] = True
                states.append((b, t, actions[:t] if retry else state.visible_ids))
            state.push(a)
    return boundaries, states


def vine_advantages(model, tokenizer, ro, rewards: torch.Tensor, newline_ids: set[int], bt: int, k: int,
                    config: BacktrackGenerationConfig, seed: Callable[[int, int, int], int],
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """VinePPO's advantages [B, S] (Kazemnejad et al. 2024): :func:`mc_values` at the :func:`mc_states` of the
    rollout ``ro``, ``k`` branches each, branch ``j`` of the state before action ``t`` of row ``b`` sampled on
    a stream seeded with ``seed(b, t, j)``; then :func:`~halluc_rl.losses.segment_advantages`."""
    boundaries, states = mc_states(ro, newline_ids, bt)
    seeds = [seed(b, t, j) for b, t, _ in states for j in range(k)]
    est = mc_values(model, tokenizer, [ro.problems[b] for b, _, _ in states], [s for _, _, s in states], k,
                    config, prompts=[ro.prompt_ids[b] for b, _, _ in states],
                    generator=row_generators(seeds, device))
    values = torch.zeros_like(rewards)  # [B, S], read at the boundaries only
    for (b, t, _), v in zip(states, est.values.tolist()):
        values[b, t] = v
    return segment_advantages(rewards, ro.action_mask, boundaries, values)
