"""DDP's bucket layout and a resume: cost and exactness of ddp_fixed_buckets (find_unused_parameters=True).

Per mode (fixed = find_unused_parameters=True, the trainer's default; regroup = DDP's default),
on W gloo ranks: (1) the time of a forward + backward + SGD step, the two modes alternating step
by step in one process; (2) a "resume": N steps in one DDP wrapper against K steps, then a fresh
wrapper (as a resumed process builds) for the remaining N - K, and how many parameter tensors
differ at step N.

    python -m torch.distributed.run --nproc_per_node 4 bench/ddp_buckets.py MODEL_DIR [--steps 40]
      -> bench/results/ddp_buckets.json (rank 0)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

MODES = {"fixed": {"find_unused_parameters": True}, "regroup": {}, "param_order": {}}


def batch(step: int, rank: int, rows: int, seq: int) -> torch.Tensor:
    return torch.randint(0, 1000, (rows, seq), generator=torch.Generator().manual_seed(1000 * step + rank))


def train(ddp: DDP, opt, step: int, rank: int, rows: int, seq: int) -> float:
    torch.manual_seed(10 * step + rank)  # dropout masks: the same in every wrapper at a step
    t0 = time.perf_counter()
    out = ddp(input_ids=batch(step, rank, rows, seq)).last_hidden_state
    (out.pow(2).mean() + 0.01 * out[:, 0].sum()).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def wrap(base, state, kwargs, mode):
    module = copy.deepcopy(base)
    module.load_state_dict(state)
    ddp = DDP(module, gradient_as_bucket_view=True, **kwargs)
    if mode == "param_order":  # DDP's one regrouping done up front, in parameter order
        ddp.reducer._push_all_rebuilt_params()
        ddp.reducer._rebuild_buckets()
    return ddp, torch.optim.SGD(ddp.parameters(), lr=0.5)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--output", default=str(Path(__file__).parent / "results" / "ddp_buckets.json"))
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    from transformers import AutoModel

    base = AutoModel.from_pretrained(args.model, add_pooling_layer=False).train()
    state = copy.deepcopy(base.state_dict())
    wrappers = {m: wrap(base, state, kw, m) for m, kw in MODES.items()}
    times = {m: [] for m in MODES}
    for step in range(1, args.steps + 1):
        order = list(MODES)[step % len(MODES):] + list(MODES)[:step % len(MODES)]
        for m in order:
            times[m].append(train(*wrappers[m], step, rank, args.rows, args.seq))
    n, k = 6, 3
    resume = {}
    for m, kw in MODES.items():
        ref, opt = wrap(base, state, kw, m)
        for step in range(1, n + 1):
            train(ref, opt, step, rank, args.rows, args.seq)
        first, opt = wrap(base, state, kw, m)
        for step in range(1, k + 1):
            train(first, opt, step, rank, args.rows, args.seq)
        again, opt = wrap(base, first.module.state_dict(), kw, m)
        for step in range(k + 1, n + 1):
            train(again, opt, step, rank, args.rows, args.seq)
        a, b = ref.module.state_dict(), again.module.state_dict()
        resume[m] = {"tensors_differing": sum(not torch.equal(a[key], b[key]) for key in a), "tensors": len(a),
                     "max_abs_diff": max((a[key] - b[key]).abs().max().item() for key in a)}
    if rank == 0:
        med = {m: statistics.median(t[3:]) for m, t in times.items()}  # the first steps: warm-up, the regrouping
        report = {"model": args.model, "world": world, "rows_per_rank": args.rows, "seq": args.seq,
                  "params": sum(p.numel() for p in base.parameters()), "steps_timed": args.steps - 3,
                  "step_s_median": med, "over_regroup": {m: med[m] / med["regroup"] for m in med},
                  "resume_after_3_of_6_steps": resume, "load_avg": os.getloadavg(),
                  "torch": torch.__version__, "omp_threads": torch.get_num_threads()}
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
        json.dump(report, sys.stdout, indent=2)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
