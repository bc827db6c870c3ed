"""DDP's bucket layout and a resume on W gloo ranks: step time and exactness of ``ddp_fixed_buckets``
(find_unused_parameters=True) against DDP's regrouping. Method and results: BENCHMARKS.md, "DDP bucket layout".
Run as ``python -m torch.distributed.run --nproc_per_node 4 bench/ddp_buckets.py MODEL_DIR``.
"""

from __future__ import annotations

import copy
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from common import machine, median, parser, rounds, write

MODES = {"fixed": {"find_unused_parameters": True}, "regroup": {}, "param_order": {}}


def train(ddp: DDP, opt, step: int, rank: int, rows: int, seq: int) -> None:
    torch.manual_seed(10 * step + rank)  # dropout masks: the same in every wrapper at a step
    ids = torch.randint(0, 1000, (rows, seq), generator=torch.Generator().manual_seed(1000 * step + rank))
    out = ddp(input_ids=ids).last_hidden_state
    (out.pow(2).mean() + 0.01 * out[:, 0].sum()).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def wrap(base, state, kwargs, mode):
    module = copy.deepcopy(base)
    module.load_state_dict(state)
    ddp = DDP(module, gradient_as_bucket_view=True, **kwargs)
    if mode == "param_order":  # DDP's one regrouping done up front, in parameter order
        ddp.reducer._push_all_rebuilt_params()
        ddp.reducer._rebuild_buckets()
    return ddp, torch.optim.SGD(ddp.parameters(), lr=0.5)


def main() -> None:
    p = parser(__doc__, "ddp_buckets.json", steps=40)
    p.add_argument("model")
    p.add_argument("--rows", type=int, default=16, help="sequences per rank")
    p.add_argument("--seq", type=int, default=32, help="tokens per sequence")
    args = p.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    from transformers import AutoModel

    base = AutoModel.from_pretrained(args.model, add_pooling_layer=False).train()
    state = copy.deepcopy(base.state_dict())
    wrappers, current = {m: wrap(base, state, kw, m) for m, kw in MODES.items()}, [1]
    # the modes alternate step by step; the first 3 steps (warm-up, DDP's regrouping) are not timed
    times, _ = rounds({m: lambda m=m: train(*wrappers[m], current[0], rank, args.rows, args.seq) for m in MODES}, 3,
                      args.steps - 3, after_round=lambda _: current.__setitem__(0, current[0] + 1), log=False)
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
        med = {m: median(t) for m, t in times.items()}
        write(args.output, {"model": args.model, "world": world, "rows_per_rank": args.rows, "seq": args.seq,
                            "params": sum(p.numel() for p in base.parameters()), "steps_timed": args.steps - 3,
                            "step_s_median": med, "over_regroup": {m: med[m] / med["regroup"] for m in med},
                            "resume_after_3_of_6_steps": resume, "load_avg": os.getloadavg(),
                            "torch": torch.__version__, "omp_threads": torch.get_num_threads(), "machine": machine()})
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
