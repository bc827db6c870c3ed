"""Run under torchrun: joint decisions and no-grad gathers behave the same on every rank; the
bank is filled the trainer's way, from the global batch that HncseLoss gathered."""

import json
import sys

import torch
import torch.distributed as dist

from hncse_dist.bank import NegativeBank
from hncse_dist.gather import all_ranks_agree, gather_no_grad
from hncse_dist.objective import HncseLoss, ObjectiveConfig


def main():
    out_path = sys.argv[1]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    # only the last rank sees a non-finite loss: every rank must decide to skip
    any_flag = all_ranks_agree(rank == world - 1)
    all_flag = all_ranks_agree(rank == world - 1, how="all")
    x = torch.full((2, 3), float(rank))
    gathered = gather_no_grad(x)
    bank = NegativeBank(2)
    for step in range(3):
        z2 = torch.full((2, 3), float(10 * step + rank), requires_grad=True)
        out = HncseLoss(ObjectiveConfig(objective="hnm"))(torch.randn(2, 3), z2, keys=torch.arange(2) + 100 * rank + step)
        assert not out.z2_global.requires_grad
        bank.push(out.z2_global, out.keys_global)
    emb, keys = bank.contents()
    everyone = [None] * world
    dist.all_gather_object(everyone, {"any": any_flag, "all": all_flag, "gathered": gathered.tolist(),
                                      "bank": emb.tolist(), "keys": keys.tolist()})
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(everyone, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
