"""Memory over a long run: resident memory of the trainer and its DataLoader workers every 100
steps of a real ``hncse-dist train`` run, read from outside through /proc. Results: BENCHMARKS.md.

    python bench/memory_long.py --model tiny --steps 2000
    python bench/memory_long.py --model minilm --steps 2000 --batch-size 32

Writes bench/results/memory_long_MODEL.json; "growth" is the trainer's RSS change from step 200 to the end.

    LRU_CACHE_CAPACITY=8 python bench/memory_long.py --step-loop 20

runs instead 20 MiniLM training steps in this process (packed forward, bf16 autocast, 32
Wikipedia sentences twice, in-batch contrastive loss, AdamW), without the trainer, the data
pipeline or ``hncse-dist``'s environment defaults: the resident size after each block of 5
steps (after ``malloc_trim``) shows what the caches named in the environment hold.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import MINILM, REPO_ROOT, RESULTS, WIKI_SAMPLE, descendants, env, md_table, parser, rss_mb, write

from tests.fixtures import build_tiny_bert


def last_step(metrics: Path) -> int:
    if not metrics.is_file():
        return 0
    with open(metrics) as f:
        return max([json.loads(line)["step"] for line in f if '"loss"' in line], default=0)


def rollup(pid: int) -> dict:
    """Anonymous and file-backed resident kB and the proportional set (shared pages split
    between the processes that map them), from /proc/PID/smaps_rollup and status, in MB."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("RssAnon:", "RssFile:", "VmHWM:")):
                    out[line.split(":")[0]] = int(line.split()[1]) / 1000
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    out["Pss"] = int(line.split()[1]) / 1000
    except OSError:
        pass
    return out


def reset_peak(pid: int) -> None:
    """Start VmHWM (the peak resident size) again from the current size (Linux >= 4.0): the next
    reading is the peak of the window since, not of the whole run."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def measure(args, out_dir: Path, model: str) -> dict:
    cmd = [sys.executable, "-m", "hncse_dist.cli", "train", f"model_name_or_path={model}", f"train_file={WIKI_SAMPLE}",
           f"output_dir={out_dir}", f"batch_size={args.batch_size}", f"max_steps={args.steps}", "log_every=10",
           f"eval_every={args.eval_every}", f"save_every={args.save_every}", "keep_last=1",
           f"mixed_precision={args.precision}", f"num_workers={args.num_workers}", "progress=false"]
    samples: dict[int, dict] = {}
    start, partial = time.time(), False
    with open(out_dir.parent / "train.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env(args.threads), stdout=log, stderr=subprocess.STDOUT)
        try:
            while proc.poll() is None:
                step, main = last_step(out_dir / "metrics.jsonl"), rss_mb(proc.pid) or 0.0
                if main > 0 and step > 0 and step // 100 * 100 not in samples:
                    kids = descendants(proc.pid)
                    workers = sum(rss_mb(p) or 0.0 for p in kids)
                    detail = rollup(proc.pid)
                    workers_pss = sum(rollup(p).get("Pss", 0.0) for p in kids)
                    reset_peak(proc.pid)
                    samples[step // 100 * 100] = {"step": step, "rss_mb": round(main, 1),
                                                  "window_peak_mb": round(detail.get("VmHWM", 0.0), 1),
                                                  "anon_mb": round(detail.get("RssAnon", 0.0), 1),
                                                  "file_mb": round(detail.get("RssFile", 0.0), 1),
                                                  "workers_rss_mb": round(workers, 1),
                                                  "workers_pss_mb": round(workers_pss, 1),
                                                  "elapsed_s": round(time.time() - start, 1)}
                    row = samples[step // 100 * 100]
                    print(f"step {step:5d}: trainer {main:8.1f} MB (window peak {row['window_peak_mb']:.0f}, anon "
                          f"{row['anon_mb']:.0f}, file {row['file_mb']:.0f}), workers {workers:8.1f} MB "
                          f"(PSS {workers_pss:.0f}), {row['elapsed_s']:.0f} s", flush=True)
                time.sleep(args.poll)
        except KeyboardInterrupt:  # stop early: the rows so far, marked partial
            partial = True
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    if proc.returncode != 0 and not partial:
        raise SystemExit(f"training failed ({proc.returncode}); see {out_dir.parent / 'train.log'}")
    rows = [samples[k] for k in sorted(samples)]
    base = next((r["rss_mb"] for r in rows if r["step"] >= 200), None)
    end = rows[-1]["rss_mb"] if rows else None
    peak_base = next((r["window_peak_mb"] for r in rows if r["step"] >= 200), None)
    peak_end = rows[-1]["window_peak_mb"] if rows else None
    return {"rows": rows, "partial": partial, "rss_at_200_mb": base, "rss_end_mb": end,
            "growth_from_200": (end - base) / base if base and end else None,
            "peak_growth_from_200": (peak_end - peak_base) / peak_base if peak_base and peak_end else None}


def step_loop(steps: int, block: int = 5) -> None:
    import ctypes
    import random

    import torch

    from hncse_dist.encoder import Encoder

    torch.set_num_threads(1)
    torch.manual_seed(0)
    random.seed(0)
    trim = ctypes.CDLL("libc.so.6").malloc_trim
    enc = Encoder.from_pretrained(MINILM, pooler="avg").train()
    opt = torch.optim.AdamW(enc.parameters(), lr=1e-5)
    lines = [line.strip() for line in open(WIKI_SAMPLE) if line.strip()]
    start = 0.0
    for i in range(-2, steps + 1):  # three warm-up steps, untimed
        start = time.perf_counter() if i == 1 else start
        sentences = random.sample(lines, 32)
        batch = enc.tokenize(sentences + sentences, 32)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z = torch.nn.functional.normalize(enc(batch["input_ids"], batch["attention_mask"]).float(), dim=-1)
        loss = torch.nn.functional.cross_entropy(z[:32] @ z[32:].T / 0.05, torch.arange(32))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i > 0 and i % block == 0:
            trim(0)
            print(f"step {i:4d}: RSS {rss_mb(os.getpid()):7.1f} MB, {(time.perf_counter() - start) / i:.2f} s/step",
                  flush=True)


def main() -> int:
    p = parser(__doc__)
    p.add_argument("--model", choices=("tiny", "minilm"), default="tiny")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--precision", default="bf16", choices=("no", "bf16"))
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--poll", type=float, default=0.5)
    p.add_argument("--step-loop", type=int, default=0, metavar="STEPS",
                   help="run STEPS MiniLM steps in this process instead (see above)")
    p.add_argument("--out", type=Path, default=None, help="JSON result (default bench/results/memory_long_MODEL.json)")
    args = p.parse_args()
    if args.step_loop:
        step_loop(args.step_loop)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        model = MINILM if args.model == "minilm" else build_tiny_bert(Path(tmp) / "tiny", hidden=128, layers=2)
        result = measure(args, Path(tmp) / "run", model)
    result["settings"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    g = result["growth_from_200"]
    table = md_table(["step", "trainer RSS (MB)", "peak since last row", "workers RSS (MB)", "workers PSS (MB)"],
                     [[r["step"], f"{r['rss_mb']:.0f}", f"{r['window_peak_mb']:.0f}", f"{r['workers_rss_mb']:.0f}",
                       f"{r['workers_pss_mb']:.0f}"] for r in result["rows"]])
    table += f"\ngrowth of the trainer's RSS from step 200 to the end: {100 * g:+.1f}%\n" if g is not None else ""
    pg = result["peak_growth_from_200"]
    table += f"growth of its window peak from step 200 to the end: {100 * pg:+.1f}%\n" if pg is not None else ""
    write(args.out or RESULTS / f"memory_long_{args.model}.json", result, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
