"""GradCache (``cache_chunk_size``): peak memory and step time against the batch size.

Run from the repository root:

    .venv/bin/python bench/gradcache.py

Options: ``--batches 16,64,128,256`` (sentences per step; 2x as many sequences),
``--chunk 64`` (sequences per chunk), ``--hidden 256 --layers 4``, ``--rounds 5``,
``--threads 1``, ``--device cpu|cuda``. Writes bench/results/gradcache.json and prints the
Markdown table.

The step: a randomly initialised BERT (MiniLM's vocabulary, no pooling layer, as the product
loads backbones) in ``hncse_dist.encoder.Encoder`` (pooler "cls", padding-free forward, dropout
on), fused AdamW, full HNCSE steps (HNM k=10, m=40) on sentences of the packaged STS-B dev set
cut at 32 tokens: ``contrastive_step`` (uncached) or ``gradcache.cached_contrastive_step``
(cached), ``loss.backward()``, ``optimizer.step()``, ``zero_grad``.

Memory: every (batch, variant) point runs two steps in a fresh subprocess (AdamW's state is
created in the first). On CPU the process's peak resident set (``ru_maxrss``; tracemalloc does
not see torch's allocations), whole and as the growth over the resident set just before the
first step (model and data loaded; the growth includes AdamW's state, the same in both
variants); on CUDA ``torch.cuda.max_memory_allocated``.
Time: one more subprocess per batch size alternates uncached and cached steps for ``--rounds``
rounds after a warm-up of each; the median of the per-round ratios is robust to the load of
a shared machine drifting, "best" is the ratio of each variant's fastest step.
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


def setup(args):
    """The product's encoder (random BERT), fused AdamW and ``one_step(i, chunk)``: a full
    HNCSE training step on batch i, GradCache with ``chunk`` sequences (0: uncached)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    sys.path.insert(0, str(REPO))
    from hncse_dist.encoder import Encoder, resolve_model_path
    from hncse_dist.eval.sts import load_pair_file
    from hncse_dist.gradcache import cached_contrastive_step
    from hncse_dist.objective import HncseLoss, ObjectiveConfig
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
    n_batches = max(1, len(sentences) // args.batch)
    loss_fn = HncseLoss(ObjectiveConfig(objective="hncse", hnm_k=10, hnm_m=40))
    gen = torch.Generator(device=dev).manual_seed(1)

    def batch(i):
        i %= n_batches
        rows = sentences[i * args.batch:(i + 1) * args.batch]
        rows = (rows * (1 + args.batch // len(rows)))[:args.batch]
        f = tok(rows, padding=True, truncation=True, max_length=32, return_tensors="pt")
        return f["input_ids"].to(dev), f["attention_mask"].to(dev), f["attention_mask"]

    def one_step(i: int, chunk: int) -> tuple[float, float]:
        ids, mask, cpu_mask = batch(i)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        if chunk:
            loss = cached_contrastive_step(encoder, ids, mask, loss_fn, generator=gen, chunk_size=chunk,
                                           packing_for=encoder.packing_for, cpu_mask=cpu_mask)[0]
        else:
            loss = contrastive_step(encoder, ids, mask, loss_fn, generator=gen,
                                    packing=encoder.packing_for(cpu_mask.repeat(2, 1), dev))[0]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = float(loss)  # a host sync on GPU
        return time.perf_counter() - t0, value

    return torch, dev, encoder, one_step


def memory_worker(args) -> dict:
    """Peak memory of two steps (AdamW's state is created in the first) in this fresh process."""
    torch, dev, encoder, one_step = setup(args)
    before = rss_now_mb()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_alloc = torch.cuda.memory_allocated()
    losses = [one_step(i, args.chunk)[1] for i in range(2)]
    out = {"batch": args.batch, "chunk": args.chunk, "losses": losses,
           "params": sum(p.numel() for p in encoder.parameters())}
    if dev.type == "cuda":
        out["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["growth_mb"] = (torch.cuda.max_memory_allocated() - base_alloc) / 2**20
    else:
        out["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        out["growth_mb"] = out["peak_mb"] - before
    return out


def time_worker(args) -> dict:
    """Uncached and cached steps alternating for ``--rounds`` rounds after one warm-up each:
    the ratio of each round's pair is robust to the machine's load drifting."""
    _, _, _, one_step = setup(args)
    one_step(0, 0), one_step(0, args.chunk)
    plain, cached = [], []
    for r in range(args.rounds):
        plain.append(one_step(r, 0)[0])
        cached.append(one_step(r, args.chunk)[0])
    ratios = [c / p for p, c in zip(plain, cached)]
    return {"batch": args.batch, "chunk": args.chunk, "uncached_s": plain, "cached_s": cached,
            "uncached_median_s": statistics.median(plain), "cached_median_s": statistics.median(cached),
            "ratio_median": statistics.median(ratios), "ratio_of_best": min(cached) / min(plain)}


def run_point(args, mode: str, batch: int, chunk: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, "--batch", str(batch), "--chunk", str(chunk),
           "--hidden", str(args.hidden), "--layers", str(args.layers), "--rounds", str(args.rounds),
           "--threads", str(args.threads), "--device", args.device]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} point batch={batch} chunk={chunk} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(result: dict) -> str:
    unit = "max_memory_allocated MB" if result["device"] == "cuda" else "peak RSS MB"
    lines = [f"| sentences / step (sequences) | uncached {unit} (growth) | cached, chunk {result['chunk']}: "
             f"{unit} (growth) | uncached step s | cached step s | time cached / uncached (median / best) |",
             "|---|---|---|---|---|---|"]
    for row in result["rows"]:
        u, c, t = row["uncached"], row["cached"], row["time"]
        lines.append(f"| {row['batch']} ({2 * row['batch']}) | {u['peak_mb']:.0f} ({u['growth_mb']:.0f}) | "
                     f"{c['peak_mb']:.0f} ({c['growth_mb']:.0f}) | {t['uncached_median_s']:.3f} | "
                     f"{t['cached_median_s']:.3f} | {t['ratio_median']:.2f}x / {t['ratio_of_best']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="16,64,128,256")
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--batch", type=int, default=16, help=argparse.SUPPRESS)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--output", default=str(RESULTS / "gradcache.json"))
    p.add_argument("--worker", choices=("memory", "time"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps((memory_worker if args.worker == "memory" else time_worker)(args)))
        return
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        row = {"batch": batch, "uncached": run_point(args, "memory", batch, 0),
               "cached": run_point(args, "memory", batch, args.chunk),
               "time": run_point(args, "time", batch, args.chunk)}
        rows.append(row)
        print(f"batch {batch}: peak uncached {row['uncached']['peak_mb']:.0f} MB, cached "
              f"{row['cached']['peak_mb']:.0f} MB; time ratio {row['time']['ratio_median']:.2f}", file=sys.stderr)
    result = {
        "command": "python bench/gradcache.py " + " ".join(sys.argv[1:]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count(), "load_avg": os.getloadavg()},
        "device": args.device, "chunk": args.chunk, "hidden": args.hidden, "layers": args.layers,
        "threads": args.threads, "rounds": args.rounds, "rows": rows,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=1))
    print(table(result))


if __name__ == "__main__":
    main()
