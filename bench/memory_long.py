"""Memory over a long run: the RSS of the trainer and its DataLoader workers every 100 steps of a real
``hncse-dist train`` run, read through /proc; ``--step-loop N``: N MiniLM training steps in this process,
without ``hncse-dist``'s cache defaults. Method and results: BENCHMARKS.md, "Memory over a long CPU run".
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import (MINILM, REPO_ROOT, RESULTS, WIKI_SAMPLE, bench_trainer, cpu_only, descendants, env, head, md_table,
                    parser, proc_mb, rss_mb, shards_of, train_step, write)

from tests.fixtures import build_tiny_bert


def last_step(metrics: Path) -> int:
    from hncse_dist.report import read_metrics  # skips a line torn by the running trainer

    return max([r["step"] for r in read_metrics(metrics) if "loss" in r], default=0) if metrics.is_file() else 0


def reset_peak(pid: int) -> None:
    """Restart VmHWM from the current size (Linux >= 4.0): the next reading is the window's peak."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def measure(args, out_dir: Path, model: str) -> dict:
    cmd = [sys.executable, "-m", "hncse_dist.cli", "train", f"model_name_or_path={model}", f"train_file={WIKI_SAMPLE}",
           f"output_dir={out_dir}", f"batch_size={args.batch_size}", f"max_steps={args.steps}", "log_every=10",
           "eval_every=500", "save_every=500", "keep_last=1", "mixed_precision=bf16", "num_workers=2", "progress=false"]
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
                    workers_pss = sum(proc_mb(p, "Pss", "smaps_rollup") or 0.0 for p in kids)
                    row = samples[step // 100 * 100] = {
                        "step": step, "rss_mb": round(main, 1), "workers_rss_mb": round(workers, 1),
                        "workers_pss_mb": round(workers_pss, 1), "elapsed_s": round(time.time() - start, 1),
                        **{k: round(proc_mb(proc.pid, key) or 0.0, 1) for k, key in (
                            ("window_peak_mb", "VmHWM"), ("anon_mb", "RssAnon"), ("file_mb", "RssFile"))}}
                    reset_peak(proc.pid)
                    print(f"step {step:5d}: trainer {main:8.1f} MB (window peak {row['window_peak_mb']:.0f}, anon "
                          f"{row['anon_mb']:.0f}, file {row['file_mb']:.0f}), workers {workers:8.1f} MB "
                          f"(PSS {workers_pss:.0f}), {row['elapsed_s']:.0f} s", flush=True)
                time.sleep(0.5)
        except KeyboardInterrupt:  # stop early: the rows so far, marked partial
            partial = True
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    if proc.returncode != 0 and not partial:
        raise SystemExit(f"training failed ({proc.returncode}); see {out_dir.parent / 'train.log'}")
    rows = [samples[k] for k in sorted(samples)]

    def growth(key: str) -> float | None:  # from the row at step 200 to the last
        base = next((r[key] for r in rows if r["step"] >= 200), None)
        return (rows[-1][key] - base) / base if base and rows[-1][key] else None

    return {"rows": rows, "partial": partial, "rss_end_mb": rows[-1]["rss_mb"] if rows else None,
            "rss_at_200_mb": next((r["rss_mb"] for r in rows if r["step"] >= 200), None),
            "growth_from_200": growth("rss_mb"), "peak_growth_from_200": growth("window_peak_mb")}


def step_loop(steps: int, block: int = 5) -> None:
    """The product's SimCSE step (``Trainer.train_step``) on MiniLM in this process, 32 sentences, bf16:
    the RSS after ``malloc_trim`` every ``block`` steps, after 3 untimed warm-up steps."""
    import torch

    from hncse_dist.metrics import release_free_memory

    cpu_only()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = bench_trainer(Path(tmp) / "run", model_name_or_path=MINILM, pooler="avg", batch_size=32,
                                train_shards=shards_of(head(WIKI_SAMPLE, 30_000), Path(tmp) / "data"),
                                max_seq_length=32, mixed_precision="bf16", objective="simcse")
        groups, start = trainer._micro_batches(), 0.0
        for i in range(-2, steps + 1):
            start = time.perf_counter() if i == 1 else start
            train_step(trainer, next(groups))
            if i > 0 and i % block == 0:
                release_free_memory()
                print(f"step {i:4d}: RSS {rss_mb(os.getpid()):7.1f} MB, {(time.perf_counter() - start) / i:.2f} s/step",
                      flush=True)


def main() -> int:
    p = parser(__doc__, steps=2000, batch_size=64, threads=2)
    p.add_argument("--model", choices=("tiny", "minilm"), default="tiny")
    p.add_argument("--step-loop", type=int, default=0, metavar="STEPS", help="run STEPS MiniLM steps in this process")
    p.add_argument("--out", type=Path, default=None, help="JSON result (default bench/results/memory_long_MODEL.json)")
    args = p.parse_args()
    if args.step_loop:
        step_loop(args.step_loop)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        model = MINILM if args.model == "minilm" else build_tiny_bert(Path(tmp) / "tiny", hidden=128, layers=2)
        result = measure(args, Path(tmp) / "run", model)
    result["settings"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    table = md_table(["step", "trainer RSS (MB)", "peak since last row", "workers RSS (MB)", "workers PSS (MB)"],
                     [[r["step"], *(f"{r[k]:.0f}" for k in ("rss_mb", "window_peak_mb", "workers_rss_mb",
                                                            "workers_pss_mb"))] for r in result["rows"]])
    for key, what in (("growth_from_200", "the trainer's RSS"), ("peak_growth_from_200", "its window peak")):
        if result[key] is not None:
            table += f"growth of {what} from step 200 to the end: {100 * result[key]:+.1f}%\n"
    write(args.out or RESULTS / f"memory_long_{args.model}.json", result, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
