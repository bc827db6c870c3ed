"""GradCache (``cache_chunk_size``): peak memory and step time against the batch size.

Run from the repository root:

    .venv/bin/python bench/gradcache.py

Options: ``--batches 16,64,128,256`` (sentences per step; 2x as many sequences),
``--chunk 64`` (sequences per chunk), ``--hidden 256 --layers 4``, ``--steps 3`` timed steps
after one warm-up, ``--threads 2``, ``--device cpu|cuda``. Writes bench/results/gradcache.json
and prints the Markdown table.

Every (batch, variant) point runs in a fresh subprocess: a randomly initialised BERT (MiniLM's
vocabulary, no pooling layer, as the product loads backbones) in ``hncse_dist.encoder.Encoder``
(pooler "cls", padding-free forward), fused AdamW, and full HNCSE training steps on sentences of
the packaged STS-B dev set cut at 32 tokens: ``contrastive_step`` (uncached) or
``gradcache.cached_contrastive_step`` (cached), ``loss.backward()``, ``optimizer.step()``,
``zero_grad``. Memory on CPU is the process's peak resident set (``ru_maxrss``; tracemalloc
does not see torch's allocations), reported whole and as the growth over the resident set just
before the first step (model and data loaded; the growth includes AdamW's state, the same in
both variants); on CUDA ``torch.cuda.max_memory_allocated``. Time is the median of the timed
steps; the two variants of a batch size run back to back.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def rss_now_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(args) -> dict:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    sys.path.insert(0, str(REPO))
    from hncse_dist.encoder import Encoder, resolve_model_path
    from hncse_dist.eval.sts import load_pair_file
    from hncse_dist.gradcache import cached_contrastive_step
    from hncse_dist.objective import ObjectiveConfig
    from hncse_dist.train import PACKAGED_STSB_DEV, contrastive_step

    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    tok = AutoTokenizer.from_pretrained(resolve_model_path("packaged"))
    cfg = BertConfig(vocab_size=len(tok), hidden_size=args.hidden, num_hidden_layers=args.layers,
                     num_attention_heads=max(1, args.hidden // 64), intermediate_size=4 * args.hidden,
                     max_position_embeddings=512)
    torch.manual_seed(0)
    encoder = Encoder(BertModel(cfg, add_pooling_layer=False), tok, pooler="cls").to(dev).train()
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=3e-5, fused=True)
    dev_set = load_pair_file(PACKAGED_STSB_DEV)
    sentences = list(dict.fromkeys(dev_set.sent1 + dev_set.sent2))
    sentences = sentences * (1 + (args.steps + 1) * args.batch // len(sentences))
    obj = ObjectiveConfig(hnm_k=10, hnm_m=40)

    def batch(i):
        rows = sentences[i * args.batch:(i + 1) * args.batch]
        f = tok(rows, padding=True, truncation=True, max_length=32, return_tensors="pt")
        return f["input_ids"].to(dev), f["attention_mask"].to(dev), f["attention_mask"]

    batches = [batch(i) for i in range(args.steps + 1)]
    real = sum(int(m.sum()) for _, _, m in batches) / sum(m.numel() for _, _, m in batches)
    gen = torch.Generator(device=dev).manual_seed(1)
    before = rss_now_mb()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_alloc = torch.cuda.memory_allocated()
    times, losses = [], []
    for step, (ids, mask, cpu_mask) in enumerate(batches):
        t0 = time.perf_counter()
        if args.chunk:
            loss = cached_contrastive_step(encoder, ids, mask, "hncse", obj, generator=gen, chunk_size=args.chunk,
                                           packing_for=encoder.packing_for, cpu_mask=cpu_mask)[0]
        else:
            loss = contrastive_step(encoder, ids, mask, "hncse", obj, generator=gen,
                                    packing=encoder.packing_for(cpu_mask.repeat(2, 1), dev))[0]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))  # a host sync on GPU
        if step > 0:
            times.append(time.perf_counter() - t0)
    out = {"batch": args.batch, "chunk": args.chunk, "step_s": statistics.median(times), "step_times": times,
           "losses": losses, "real_token_fraction": real,
           "params": sum(p.numel() for p in encoder.parameters())}
    if dev.type == "cuda":
        out["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["growth_mb"] = (torch.cuda.max_memory_allocated() - base_alloc) / 2**20
    else:
        out["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        out["growth_mb"] = out["peak_mb"] - before
    return out


def run_point(args, batch: int, chunk: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--batch", str(batch), "--chunk", str(chunk),
           "--hidden", str(args.hidden), "--layers", str(args.layers), "--steps", str(args.steps),
           "--threads", str(args.threads), "--device", args.device]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"point batch={batch} chunk={chunk} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(result: dict) -> str:
    unit = "max_memory_allocated MB" if result["device"] == "cuda" else "peak RSS MB"
    lines = [f"| sentences / step (sequences) | uncached {unit} (growth) | cached, chunk {result['chunk']} "
             f"{unit} (growth) | uncached step s | cached step s | time cached / uncached |",
             "|---|---|---|---|---|---|"]
    for row in result["rows"]:
        u, c = row["uncached"], row["cached"]
        lines.append(f"| {row['batch']} ({2 * row['batch']}) | {u['peak_mb']:.0f} ({u['growth_mb']:.0f}) | "
                     f"{c['peak_mb']:.0f} ({c['growth_mb']:.0f}) | {u['step_s']:.3f} | {c['step_s']:.3f} | "
                     f"{c['step_s'] / u['step_s']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="16,64,128,256")
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--batch", type=int, default=16, help=argparse.SUPPRESS)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--output", default=str(RESULTS / "gradcache.json"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        row = {"batch": batch, "uncached": run_point(args, batch, 0), "cached": run_point(args, batch, args.chunk)}
        row["time_ratio"] = row["cached"]["step_s"] / row["uncached"]["step_s"]
        rows.append(row)
        print(f"batch {batch}: uncached {row['uncached']['peak_mb']:.0f} MB {row['uncached']['step_s']:.3f} s | "
              f"cached {row['cached']['peak_mb']:.0f} MB {row['cached']['step_s']:.3f} s", file=sys.stderr)
    result = {
        "command": "python bench/gradcache.py " + " ".join(sys.argv[1:]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count(), "load_avg": os.getloadavg()},
        "device": args.device, "chunk": args.chunk, "hidden": args.hidden, "layers": args.layers,
        "threads": args.threads, "steps": args.steps, "rows": rows,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=1))
    print(table(result))


if __name__ == "__main__":
    main()
