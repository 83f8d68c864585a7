"""Reductions over the processes of a data-parallel run, for trainers that average by hand (PPO).

Each helper works in a single process (no process group, or a group of one) and under ``torch.distributed``
(the group ``accelerate launch`` starts, or any other). The reductions are those of ``Accelerator.reduce``: a
clone summed over processes, divided by the number of processes for a mean, so a run launched either way
gets the same bits. Every process must call a helper the same number of times, in the same order, with
tensors of the same shapes: these are collectives.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist


def world_size() -> int:
    """The number of processes in the default group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_sum(tensor: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """``tensor`` summed over every process, as a new tensor on ``tensor``'s device.

    ``device`` is where the collective runs (the accelerator's device: NCCL reduces only GPU tensors).
    """
    reduced = tensor.to(device).clone() if device is not None else tensor.clone()
    if world_size() > 1:
        dist.all_reduce(reduced, dist.ReduceOp.SUM)
    return reduced.to(tensor.device)


def all_mean(tensor: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """``tensor`` averaged over every process (the sum divided by the number of processes)."""
    reduced = all_sum(tensor, device)
    reduced /= world_size()
    return reduced


def average_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """Data parallel without a wrapper: replace each gradient by its mean over processes (a no-op alone).

    A parameter without a gradient joins the average with zeros, so that every process reduces the same list
    of tensors whatever its own loss touched.
    """
    if world_size() == 1:
        return
    for p in params:
        p.grad = all_mean(torch.zeros_like(p) if p.grad is None else p.grad)


def zero_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """Give every parameter a zero gradient: what a process without rows in a minibatch adds to the mean."""
    for p in params:
        p.grad = torch.zeros_like(p) if p.grad is None else p.grad.zero_()


def seed_of(*keys: int) -> int:
    """A seed mixed from integers, the same in every process (Python's ``hash`` is salted for strings)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0] % 2**62)


def process_share(seed: int, pool_size: int, per_update: int, update: int, rank: int, world: int) -> list[int]:
    """This process's share of update ``update``'s ``per_update`` problems (indices into a pool of ``pool_size``):
    the update's slice of a permutation of the pool drawn once per pass over it (seeded by ``seed`` and the
    pass), slots ``s`` with ``s % world == rank``. Any number of processes together take the same problems."""
    perm = np.random.default_rng(seed_of(seed, update // max(1, pool_size // per_update))).permutation(pool_size)
    first = (update * per_update) % pool_size
    chosen = [int(perm[(first + i) % pool_size]) for i in range(per_update)]
    return chosen[rank::world]
