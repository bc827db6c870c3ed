"""Run under torchrun: the distributed HNCSE gradient equals the single-process gradient.

Each rank takes its slice of a fixed global batch, computes hncse_loss (which gathers all
ranks' candidates with gradient), backpropagates, and averages parameter gradients as DDP
does. Rank 0 compares with the loss and gradient of one process on the whole batch.
"""

import json
import sys

import torch
import torch.distributed as dist

from hncse_dist.objective import hncse_loss
from script_report import finish

torch.set_default_dtype(torch.float32)


def encoder():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 24))


def global_batch(n):
    g = torch.Generator().manual_seed(1)
    x1 = torch.randn(n, 16, generator=g)
    # correlated second view, plus a few rows that are near-copies of others so every PM case occurs
    x2 = x1 + 0.7 * torch.randn(n, 16, generator=g)
    x2[1] = x1[2] + 0.05 * torch.randn(16, generator=g)
    return x1, x2


def fixed_bank(rows=12, dim=24):
    """Detached embeddings of "earlier batches": the same tensor on every rank, as the bank is."""
    return torch.randn(rows, dim, generator=torch.Generator().manual_seed(2))


def main():
    objective, out_path = sys.argv[1], sys.argv[2]
    extra = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}  # e.g. {"bank": true, "hnm_grad": true}
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    n_local = 4
    x1, x2 = global_batch(n_local * world)
    rows = slice(rank * n_local, (rank + 1) * n_local)
    # hnm_k=1: the synthetic negatives are each anchor's hardest candidate itself, so the draw of
    # positions (per-rank random streams in a real run) cannot differ from the single process's,
    # while top-k over gathered batch + bank, the global exclusion mask and hnm_grad are all exercised.
    kw = dict(pm_threshold=0.3, bank_in_logits=extra.pop("bank_in_logits", False), hnm_k=1, hnm_m=3,
              hnm_grad=extra.pop("hnm_grad", False))
    if extra.pop("bank", False):
        kw["bank"] = fixed_bank()

    model = encoder()
    z1 = model(x1[rows]).detach().requires_grad_()
    z2 = model(x2[rows]).detach().requires_grad_()
    loss = hncse_loss(z1, z2, objective, **kw)
    loss.backward()
    # parameter gradient through the encoder, DDP-style average
    model.zero_grad()
    hncse_loss(model(x1[rows]), model(x2[rows]), objective, **kw).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    for g in grads:
        dist.all_reduce(g)
        g /= world
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    mean_loss /= world
    zgrads = [torch.empty_like(z1.grad) for _ in range(world)]
    dist.all_gather(zgrads, z1.grad / world)
    z2grads = [torch.empty_like(z2.grad) for _ in range(world)]
    dist.all_gather(z2grads, z2.grad / world)

    report = None
    if rank == 0:
        ref = encoder()
        rz1 = ref(x1).detach().requires_grad_()
        rz2 = ref(x2).detach().requires_grad_()
        ref_loss = hncse_loss(rz1, rz2, objective, gather=False, **kw)
        ref_loss.backward()
        ref.zero_grad()
        hncse_loss(ref(x1), ref(x2), objective, gather=False, **kw).backward()
        report = {
            "world": world,
            "loss": mean_loss.item(),
            "ref_loss": ref_loss.item(),
            "max_param_grad_rel_err": max(
                ((g - p.grad).abs().max() / p.grad.abs().max()).item() for g, p in zip(grads, ref.parameters())
            ),
            "z1_grad_close": torch.allclose(torch.cat(zgrads), rz1.grad, rtol=1e-5, atol=1e-7),
            "z2_grad_close": torch.allclose(torch.cat(z2grads), rz2.grad, rtol=1e-5, atol=1e-7),
            "params_grad_close": all(
                torch.allclose(g, p.grad, rtol=1e-5, atol=1e-7) for g, p in zip(grads, ref.parameters())
            ),
        }
    finish(report, out_path)


if __name__ == "__main__":
    main()
