"""Memory over a long run: resident memory of the trainer (and its DataLoader workers) every
100 steps of a real ``hncse-dist train`` run, measured from outside through /proc.

    python bench/memory_long.py --model tiny --steps 2000
    python bench/memory_long.py --model minilm --steps 2000 --batch-size 32

The run trains on the packaged 30k-sentence Wikipedia sample (several epochs when the steps
ask for it), fp32 or bf16, with STS-B dev evaluation and checkpoints at their usual cadence,
so everything a long run does is inside the window. Output: a JSON file in bench/results/ and
a Markdown table; "growth" is the change of the trainer's RSS from step 200 to the end
(target < 10%).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from tests.fixtures import MINILM, build_tiny_bert  # noqa: E402


def rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except FileNotFoundError:
        pass
    return 0.0


def descendants(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    kids = [int(p) for p in out]
    return kids + [g for k in kids for g in descendants(k)]


def last_step(metrics: Path) -> int:
    if not metrics.is_file():
        return 0
    step = 0
    with open(metrics) as f:
        for line in f:
            if '"loss"' in line:
                step = json.loads(line)["step"]
    return step


def measure(args, out_dir: Path, model: str) -> dict:
    cmd = [sys.executable, "-m", "hncse_dist.cli", "train",
           f"model_name_or_path={model}", f"train_file={REPO_ROOT / 'hncse_dist/resources/wiki_sample.txt'}",
           f"output_dir={out_dir}", f"batch_size={args.batch_size}", f"max_steps={args.steps}", "log_every=10",
           f"eval_every={args.eval_every}", f"save_every={args.save_every}", "keep_last=1",
           f"mixed_precision={args.precision}", f"num_workers={args.num_workers}", "progress=false"]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(REPO_ROOT))
    log = open(out_dir.parent / "train.log", "w")
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    samples: dict[int, dict] = {}
    t0 = time.time()
    try:
        while proc.poll() is None:
            step = last_step(out_dir / "metrics.jsonl")
            bucket = step // 100 * 100
            main = rss_mb(proc.pid)
            workers = sum(rss_mb(p) for p in descendants(proc.pid))
            if main > 0 and step > 0 and bucket not in samples:
                samples[bucket] = {"step": step, "rss_mb": round(main, 1), "workers_rss_mb": round(workers, 1),
                                   "elapsed_s": round(time.time() - t0, 1)}
                print(f"step {step:5d}: trainer {main:8.1f} MB, workers {workers:8.1f} MB", flush=True)
            time.sleep(args.poll)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        log.close()
    if proc.returncode != 0:
        raise SystemExit(f"training failed ({proc.returncode}); see {out_dir.parent / 'train.log'}")
    rows = [samples[k] for k in sorted(samples)]
    base = next((r["rss_mb"] for r in rows if r["step"] >= 200), None)
    end = rows[-1]["rss_mb"] if rows else None
    return {"rows": rows, "rss_at_200_mb": base, "rss_end_mb": end,
            "growth_from_200": (end - base) / base if base and end else None}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("tiny", "minilm"), default="tiny")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--precision", default="bf16", choices=("no", "bf16"))
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--poll", type=float, default=0.5)
    p.add_argument("--out", default=None, help="JSON result (default bench/results/memory_long_MODEL.json)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = MINILM if args.model == "minilm" else build_tiny_bert(Path(tmp) / "tiny", hidden=128, layers=2)
        result = measure(args, Path(tmp) / "run", model)
    result["settings"] = vars(args)
    out = Path(args.out or REPO_ROOT / "bench" / "results" / f"memory_long_{args.model}.json")
    out.write_text(json.dumps(result, indent=2))
    print(f"\n| step | trainer RSS (MB) | workers RSS (MB) |\n|---|---|---|")
    for r in result["rows"]:
        print(f"| {r['step']} | {r['rss_mb']:.0f} | {r['workers_rss_mb']:.0f} |")
    g = result["growth_from_200"]
    print(f"\ngrowth of the trainer's RSS from step 200 to the end: {100 * g:+.1f}%" if g is not None else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
