"""The reductions of halluc_rl.distributed: two gloo processes on halves of the data give what one
process gives on all of it (whitening, counts, averaged gradients, a process with no rows); alone they
change nothing."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from halluc_rl import distributed
from halluc_rl.losses import masked_whiten

# Values on a 1/8 grid, so every sum is exact in any order and the comparisons can be bitwise.
ADV = torch.arange(-20, 20, dtype=torch.float32).view(4, 10) / 8  # [4, 10]: rows 0-1 on process 0, 2-3 on 1
MASK = torch.arange(10).unsqueeze(0) < torch.tensor([[10], [3], [7], [1]])  # [4, 10]
GRADS = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, -6.0])]  # process r's gradient of the shared weight


def step(weight: torch.nn.Parameter, bias: torch.nn.Parameter, rank: int, empty: bool) -> None:
    """A minibatch step's gradients: the weight's own, or zeros on a process with no rows (the bias is
    untouched by the loss: it has no gradient unless zeroed)."""
    weight.grad, bias.grad = None, None
    if empty:
        distributed.zero_gradients([weight, bias])
    else:
        weight.grad = GRADS[rank].clone()
    distributed.average_gradients([weight, bias])


def worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        rows = slice(2 * rank, 2 * rank + 2)
        weight, bias = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
        step(weight, bias, rank, empty=False)
        both = (weight.grad.clone(), bias.grad.clone())
        step(weight, bias, rank, empty=rank == 1)
        torch.save({
            "world": distributed.world_size(),
            "whitened": masked_whiten(ADV[rows], MASK[rows], reduce=distributed.all_sum),
            "count": distributed.all_sum(MASK[rows].sum().float()),
            "mean": distributed.all_mean(torch.tensor([float(rank), 2.0 * rank])),
            "both": both, "one_empty": (weight.grad.clone(), bias.grad.clone()),
        }, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_reduce_to_what_one_process_computes_on_all_the_data(tmp_path):
    # fork: the children start without importing torch again (a few seconds on a busy machine)
    mp.start_processes(worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="fork")
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    whole = masked_whiten(ADV, MASK)
    assert torch.equal(torch.cat([r["whitened"] for r in results]), whole)
    assert whole[MASK].abs().sum() > 0 and abs(float(whole[MASK].mean())) < 1e-6
    for r in results:
        assert r["world"] == 2 and r["count"].item() == MASK.sum().item()
        assert torch.equal(r["mean"], torch.tensor([0.5, 1.0]))
        assert torch.equal(r["both"][0], (GRADS[0] + GRADS[1]) / 2)
        assert torch.equal(r["both"][1], torch.zeros(1))  # no gradient anywhere: zeros
        assert torch.equal(r["one_empty"][0], GRADS[0] / 2)  # the empty process adds zeros to the average


def test_alone_the_helpers_change_nothing():
    x = torch.tensor([1.0, 2.0])
    summed = distributed.all_sum(x)
    assert distributed.world_size() == 1 and torch.equal(summed, x) and summed is not x
    assert torch.equal(distributed.all_mean(x), x)
    assert torch.equal(masked_whiten(ADV, MASK, reduce=distributed.all_sum), masked_whiten(ADV, MASK))
    weight = torch.nn.Parameter(torch.zeros(2))
    weight.grad = GRADS[0].clone()
    distributed.average_gradients([weight])
    assert torch.equal(weight.grad, GRADS[0])
    distributed.zero_gradients([weight])
    assert torch.equal(weight.grad, torch.zeros(2))
