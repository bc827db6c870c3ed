"""Peak memory per rank over a whole training run (the product's ``train()``) under DDP and DeepSpeed
ZeRO-2 / ZeRO-3 on CPU ranks (gloo), the product's phases wrapped to read VmHWM / VmRSS as each ends.
Method and results: BENCHMARKS.md, "ZeRO memory per rank".
"""

from __future__ import annotations

import inspect
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common  # noqa: E402  (puts the repository on sys.path)

SHAPES = {"large": (1024, 24), "base": (768, 12), "small": (256, 4)}  # hidden, layers
CONFIGS = {"ddp": None, "zero1": "ds_configs/zero1.json", "zero2": "ds_configs/zero2.json",
           "zero3": "ds_configs/zero3.json"}
PHASES = ("accelerator", "load", "prepare", "forward", "backward", "update", "steps", "checkpoint",
          "export weights", "export st re-save", "export")


def _mark_after(owner, name: str, phase: str, marks: dict, first: bool = False) -> None:
    """Wrap ``owner.name`` (function, method or classmethod): when it returns, record VmHWM and
    VmRSS (MB) under ``phase`` (the last call wins: "steps" is after the last step; ``first``:
    the first call wins)."""
    static = inspect.getattr_static(owner, name)
    func = static.__func__ if isinstance(static, classmethod) else getattr(owner, name)

    def wrapped(*a, **kw):
        out = func(*a, **kw)
        if not (first and phase in marks):
            marks[phase] = {"hwm_mb": common.proc_mb(os.getpid(), "VmHWM"), "rss_mb": common.rss_mb(os.getpid())}
        return out

    setattr(owner, name, classmethod(wrapped) if isinstance(static, classmethod) else wrapped)


def rank_main(args) -> None:
    import accelerate
    import torch

    import hncse_dist.train as trainer
    from hncse_dist.checkpoint import Checkpointer
    from hncse_dist.config import load_config
    from hncse_dist.encoder import Encoder

    marks: dict = {}
    for owner, name, phase in ((trainer, "make_accelerator", "accelerator"), (Encoder, "from_pretrained", "load"),
                               (accelerate.Accelerator, "prepare", "prepare"),
                               # inside the last step: its loss, its backward, its optimizer update
                               (trainer.Trainer, "_loss", "forward"), (torch.Tensor, "backward", "backward"),
                               (accelerate.optimizer.AcceleratedOptimizer, "step", "update"),
                               (trainer, "maybe_eval", "steps"),  # after every step, before its checkpoint
                               (Checkpointer, "save", "checkpoint"), (trainer, "export", "export")):
        _mark_after(owner, name, phase, marks)
    import transformers.modeling_utils

    import hncse_dist.export
    import hncse_dist.st_modules

    # inside the export: the weights written (DeepSpeed: streamed; DDP: transformers' save of the
    # state dict), sentence-transformers' re-save done (a child process: export_st_resave=child)
    _mark_after(hncse_dist.export.SafetensorsStream, "close", "export weights", marks)
    _mark_after(transformers.modeling_utils, "safe_save_file", "export weights", marks, first=True)
    _mark_after(hncse_dist.st_modules, "save_with_library", "export st re-save", marks)
    if CONFIGS[args.variant]:  # DeepSpeed's update runs in its engine, called by Accelerator.backward
        from deepspeed.runtime.engine import DeepSpeedEngine

        _mark_after(DeepSpeedEngine, "step", "update", marks)
    overrides = [f"model_name_or_path={args.model}", f"train_file={args.corpus}", f"output_dir={args.out}/run",
                 f"batch_size={args.batch_size}", f"max_seq_length={args.max_length}", f"max_steps={args.steps}",
                 "log_every=1", "eval_file=null", "save_every=0", f"num_workers={args.num_workers}",
                 "progress=false", "objective=hncse", "bank_size=4", f"mixed_precision={args.precision}",
                 f"malloc_mmap_threshold_mb={args.malloc_mmap_threshold_mb}",
                 "export_st_resave=child"]  # every variant alike (auto: DeepSpeed only)
    if CONFIGS[args.variant]:
        overrides.append(f"deepspeed={CONFIGS[args.variant]}")
    if args.gradient_checkpointing:
        overrides.append("gradient_checkpointing=true")
    with common.MemorySampler(os.getpid(), interval=0.2) as memory:
        code = trainer.train(load_config(None, overrides).validate())
    rank = int(os.environ["RANK"])
    record = {"rank": rank, "exit": code, "peak_rss_mb": max(memory.peak_rss_mb, common.proc_mb(os.getpid(), "VmHWM")),
              "peak_pss_rank_and_workers_mb": memory.peak_pss_mb, "workers": len(memory.rss) - 1, "phases": marks}
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(record))
    sys.stdout.flush()
    os._exit(0)  # DeepSpeed's CPU communication threads may abort a normal interpreter teardown


def run_variant(args, variant: str, model: str, corpus: Path, tmp: Path) -> dict:
    out = tmp / f"{variant}-{args.precision}"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(common.free_port()), __file__, "--rank-mode",
           "--variant", variant, "--model", model, "--corpus", str(corpus), "--out", str(out),
           *(f"--{k.replace('_', '-')}={getattr(args, k)}"
             for k in ("precision", "steps", "batch_size", "max_length", "num_workers", "malloc_mmap_threshold_mb")),
           *(["--gradient-checkpointing"] if args.gradient_checkpointing else [])]
    start = time.perf_counter()
    # Own session, output to a file: what outlives the launcher (a killed rank's DataLoader fork
    # server) neither holds a pipe open nor survives the run.
    with open(out / "log.txt", "w") as log_file:
        proc = subprocess.Popen(cmd, cwd=common.REPO_ROOT, env=common.env(threads=args.threads),
                                stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            code = "timeout"
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    log = (out / "log.txt").read_text(errors="replace")
    ranks = sorted((json.loads(p.read_text()) for p in out.glob("rank*.json")), key=lambda r: r["rank"])
    run = {"variant": variant, "precision": args.precision, "seconds": round(time.perf_counter() - start, 1),
           "load_avg_after": os.getloadavg(), "ranks": ranks}
    if code != 0 or len(ranks) != args.nproc:
        run["error"] = f"exit {code}, {len(ranks)} rank records"
        run["log_tail"] = (log or "")[-4000:]
    return run


def table(result: dict) -> str:
    runs = result["runs"]
    rows = []
    for run in runs:  # each against DDP in its precision
        base = next((r for r in runs if r["variant"] == "ddp" and "error" not in r
                     and r["precision"] == run["precision"]), None)
        base_rss = max(r["peak_rss_mb"] for r in base["ranks"]) if base else None
        base_pss = sum(r["peak_pss_rank_and_workers_mb"] for r in base["ranks"]) if base else None
        if "error" in run:
            rows.append([run["variant"], run["precision"], run["error"]] + [""] * (4 + len(PHASES)))
            continue
        rss = max(r["peak_rss_mb"] for r in run["ranks"])
        pss = sum(r["peak_pss_rank_and_workers_mb"] for r in run["ranks"])
        top = max(run["ranks"], key=lambda r: r["peak_rss_mb"])
        phases = [f"{top['phases'][p]['hwm_mb']:.0f} / {top['phases'][p]['rss_mb']:.0f}" if p in top["phases"]
                  else "n/a" for p in PHASES]
        rows.append([run["variant"], run["precision"], f"{rss:.0f}", f"{rss / base_rss:.2f}" if base_rss else "n/a",
                     f"{pss:.0f}", f"{pss / base_pss:.2f}" if base_pss else "n/a", *phases, f"{run['seconds']:.0f}"])
    header = ["variant", "precision", "peak RSS MB/rank", "vs DDP", "PSS MB all ranks + workers", "vs DDP",
              *(f"after {p} (HWM / RSS)" for p in PHASES), "s"]
    return common.md_table(header, rows)


def main() -> None:
    p = common.parser(__doc__, steps=2, batch_size=16, threads=1)
    p.add_argument("--shape", choices=SHAPES, default="large", help="large: bert-large, base: bert-base, small: 256x4")
    p.add_argument("--nproc", type=int, default=2, help="ranks")
    p.add_argument("--variants", default="ddp,zero2,zero3", help=f"comma-separated, of {list(CONFIGS)}")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--max-length", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--malloc-mmap-threshold-mb", type=float, default=1.0,
                   help="the product's malloc_mmap_threshold_mb in every variant alike (0: glibc's default)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="gradient_checkpointing=true in every run")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per variant")
    p.add_argument("--output", type=Path, help="JSON path (default bench/results/zero_memory_SHAPE_NPROC[_bf16].json)")
    p.add_argument("--rank-mode", action="store_true", help="internal: one rank of a run")
    for internal in ("--variant", "--model", "--corpus", "--out"):
        p.add_argument(internal, help="internal")
    args = p.parse_args()
    if args.rank_mode:
        return rank_main(args)
    unknown = [v for v in args.variants.split(",") if v not in CONFIGS]
    if unknown:
        p.error(f"unknown variants {unknown}")
    common.cpu_only()
    suffix = ("" if args.precision == "fp32" else f"_{args.precision}") + ("_gc" if args.gradient_checkpointing else "")
    output = args.output or common.RESULTS / f"zero_memory_{args.shape}_{args.nproc}{suffix}.json"
    hidden, layers = SHAPES[args.shape]
    result = {"command": "python bench/zero_memory.py " + " ".join(sys.argv[1:]), "machine": common.machine(),
              "shape": args.shape, "hidden": hidden, "layers": layers, "nproc": args.nproc,
              "precision": args.precision, "steps": args.steps, "batch_size": args.batch_size,
              "max_length": args.max_length, "num_workers": args.num_workers,
              "gradient_checkpointing": args.gradient_checkpointing,
              "malloc_mmap_threshold_mb": args.malloc_mmap_threshold_mb, "units": "MB = 1e6 bytes", "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        model = common.random_bert(Path(tmp) / "model", hidden, layers)
        result["parameters"] = parameters(model)
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("\n".join(common.head(common.WIKI_SAMPLE, 4000)) + "\n", encoding="utf-8")
        for variant in args.variants.split(","):
            print(f"{variant} ({args.precision}) ...", flush=True)
            run = run_variant(args, variant, model, corpus, Path(tmp))
            print(run.get("error", "") + run.get("log_tail", "") or
                  f"  peak RSS MB per rank {[round(r['peak_rss_mb']) for r in run['ranks']]} ({run['seconds']:.0f} s)",
                  flush=True)
            result["runs"].append(run)
            common.write(output, result, table(result))  # after every variant: a failure later loses nothing


def parameters(model_dir: str) -> int:
    from safetensors import safe_open

    with safe_open(str(Path(model_dir) / "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


if __name__ == "__main__":
    main()
