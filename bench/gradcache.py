"""GradCache (``cache_chunk_size``): peak memory and step time of the product's step against the
batch size. Commands, method and results: BENCHMARKS.md."""

from __future__ import annotations

import itertools
import json
import os
import sys
import tempfile
from pathlib import Path

from common import (bench_trainer, cpu_only, machine, md_table, median, paired, parser, python, random_bert, rounds,
                    rss_mb, shards_of, train_step, write)


def worker(args) -> dict:
    """One point: the product's Trainer per chunk size (0: uncached), HNCSE (HNM k=10, m=40, no
    bank), fp32, on the packaged STS-B dev sentences."""
    import torch

    from hncse_dist.eval.sts import load_pair_file
    from hncse_dist.metrics import memory_gb
    from hncse_dist.train import PACKAGED_STSB_DEV

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as name:
        dev, tmp = load_pair_file(PACKAGED_STSB_DEV), Path(name)
        shards = shards_of(list(dict.fromkeys(dev.sent1 + dev.sent2)), tmp / "data")
        model = args.model or random_bert(tmp / "model", args.hidden, args.layers)
        chunks = (args.chunk,) if args.worker == "memory" else (0, args.chunk)
        made = {c: bench_trainer(tmp / f"run-{c}", model_name_or_path=model, train_shards=shards, batch_size=args.batch,
                                 max_seq_length=32, objective="hncse", hnm_k=10, hnm_m=40, bank_size=0,
                                 cache_chunk_size=c) for c in chunks}
        groups = {c: list(itertools.islice(t._micro_batches(), 2 if args.worker == "memory" else args.rounds + 1))
                  for c, t in made.items()}
        if args.worker == "memory":  # two steps (AdamW's state is created in the first) in a fresh process
            t, device = made[args.chunk], made[args.chunk].acc.device
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated() / 1e6 if device.type == "cuda" else rss_mb(os.getpid())
            losses = [train_step(t, g) for g in groups[args.chunk]]
            peak = 1e3 * memory_gb(device)
            return {"batch": args.batch, "chunk": args.chunk, "losses": losses, "peak_mb": peak,
                    "growth_mb": peak - before, "params": sum(p.numel() for p in t.encoder.parameters())}
        cycles = {c: itertools.cycle(g) for c, g in groups.items()}
        times, _ = rounds({c: (lambda c=c: train_step(made[c], next(cycles[c]))) for c in chunks}, 1, args.rounds,
                          log=False)
        plain, cached = times[0], times[args.chunk]
        ratio_median, ratio_of_best = paired(cached, plain)
        return {"batch": args.batch, "chunk": args.chunk, "uncached_s": plain, "cached_s": cached,
                "uncached_median_s": median(plain), "cached_median_s": median(cached),
                "ratio_median": ratio_median, "ratio_of_best": ratio_of_best}


def point(args, mode: str, batch: int, chunk: int) -> dict:
    proc = python(__file__, "--worker", mode, "--batch", batch, "--chunk", chunk, "--rounds", args.rounds, "--threads",
                  args.threads, "--device", args.device, "--model", args.model, threads=args.threads, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} point batch={batch} chunk={chunk} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = parser(__doc__, "gradcache.json", threads=1, model=None)
    p.add_argument("--batches", default="16,64,128,256", help="sentences per step (2x as many sequences)")
    p.add_argument("--chunk", type=int, default=64, help="sequences per chunk")
    p.add_argument("--batch", type=int, default=16, help="--worker's batch")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--worker", choices=("memory", "time"), help="measure one point in this process, print its JSON")
    args = p.parse_args()
    cpu_only(args.device)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as name:
        args.model = random_bert(Path(name) / "model", args.hidden, args.layers)
        for batch in [int(b) for b in args.batches.split(",")]:
            row = {"batch": batch, "uncached": point(args, "memory", batch, 0),
                   "cached": point(args, "memory", batch, args.chunk), "time": point(args, "time", batch, args.chunk)}
            rows.append(row)
            print(f"batch {batch}: peak {row['uncached']['peak_mb']:.0f} / {row['cached']['peak_mb']:.0f} MB, "
                  f"time ratio {row['time']['ratio_median']:.2f}", file=sys.stderr, flush=True)
    unit = "max_memory_allocated MB" if args.device == "cuda" else "peak RSS MB"
    table = md_table(["sentences / step (sequences)", f"uncached {unit} (growth)",
                      f"cached, chunk {args.chunk}: {unit} (growth)", "uncached step s", "cached step s",
                      "time cached / uncached (median / best)"],
                     [[f"{r['batch']} ({2 * r['batch']})",
                       *(f"{r[k]['peak_mb']:.0f} ({r[k]['growth_mb']:.0f})" for k in ("uncached", "cached")),
                       f"{r['time']['uncached_median_s']:.3f}", f"{r['time']['cached_median_s']:.3f}",
                       f"{r['time']['ratio_median']:.2f}x / {r['time']['ratio_of_best']:.2f}x"] for r in rows])
    result = {"command": "python bench/gradcache.py " + " ".join(sys.argv[1:]), "machine": machine(),
              "device": args.device, "chunk": args.chunk, "hidden": args.hidden, "layers": args.layers,
              "threads": args.threads, "rounds": args.rounds, "rows": rows}
    write(args.output, result, table)


if __name__ == "__main__":
    main()
