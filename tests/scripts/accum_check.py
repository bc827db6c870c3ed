"""Run under torchrun: what a gradient-accumulation micro-step sees as negatives.

Documented semantics: micro-step m of every rank forms ONE global micro-batch (all ranks'
rows of micro-step m); its negatives are that global micro-batch (+ the bank), never the
rows of other micro-steps. So the accumulated gradient equals the single-process gradient
of mean_m loss(global micro-batch m), and differs from the loss of one big batch.
"""

import sys

import torch
import torch.distributed as dist

from hncse_dist.objective import hncse_loss
from script_report import finish


def encoder():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 24))


def main():
    objective, out_path = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    n, accum = 3, 2
    g = torch.Generator().manual_seed(1)
    # x[m] is global micro-batch m: rows r*n..(r+1)*n belong to rank r
    x1 = torch.randn(accum, n * world, 16, generator=g)
    x2 = x1 + 0.5 * torch.randn(accum, n * world, 16, generator=g)

    model = encoder()
    rows = slice(rank * n, (rank + 1) * n)
    for m in range(accum):
        (hncse_loss(model(x1[m, rows]), model(x2[m, rows]), objective) / accum).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    for t in grads:
        dist.all_reduce(t)
        t /= world
    report = None
    if rank == 0:
        ref = encoder()
        sum(hncse_loss(ref(x1[m]), ref(x2[m]), objective, gather=False) for m in range(accum)).div(accum).backward()
        big = encoder()
        hncse_loss(big(x1.flatten(0, 1)), big(x2.flatten(0, 1)), objective, gather=False).backward()
        report = {
            "matches_micro_batch_semantics": all(
                torch.allclose(a, p.grad, rtol=1e-5, atol=1e-7) for a, p in zip(grads, ref.parameters())),
            "differs_from_one_big_batch": any(
                not torch.allclose(a, p.grad, rtol=1e-3, atol=1e-6) for a, p in zip(grads, big.parameters())),
        }
    finish(report, out_path)


if __name__ == "__main__":
    main()
