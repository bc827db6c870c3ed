"""The end every torchrun check script shares: rank 0 writes its JSON report, then all ranks
leave the process group together."""

import json

import torch.distributed as dist


def finish(report: dict | None, out_path: str) -> None:
    if report is not None:
        with open(out_path, "w") as f:
            json.dump(report, f)
    dist.barrier()
    dist.destroy_process_group()
