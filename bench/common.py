"""What the benchmarks share: paths and the data-dir setting, random BERTs, the product's Trainer
set up to time its step, round-robin timing, /proc memory, subprocesses, result files."""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # the scripts run as files: python bench/NAME.py

from hncse_dist.launcher import free_port  # noqa: E402,F401  (one home for free ports)
from tests.fixtures import MINILM, build_tiny_bert  # noqa: E402,F401  (the packaged all-MiniLM-L6-v2)

RESULTS = REPO_ROOT / "bench" / "results"
WIKI_SAMPLE = REPO_ROOT / "hncse_dist" / "resources" / "wiki_sample.txt"  # packaged 30k sentences


def data_root() -> Path:
    """The one data-dir setting (tests/datadir.py, which needs pytest): $HNCSE_DATA_DIR, else ../shared/data."""
    from tests import datadir

    return datadir.data_root()


def corpus() -> Path:
    return data_root() / "corpus" / "wiki_en_sentences.txt"


def head(path: Path, lines: int) -> list[str]:
    """The distinct non-empty sentences among the first ``lines`` lines of ``path``, in order."""
    with open(path, encoding="utf-8") as f:
        return list(dict.fromkeys(s for s in (line.strip() for _, line in zip(range(lines), f)) if s))


# options several scripts take: name -> (type, help); ``parser(..., threads=1)`` adds ``--threads`` defaulting to 1
OPTIONS = {"threads": (int, "torch / OMP threads (0 or none: torch's default)"), "corpus": (Path, "sentence file"),
           "model": (str, "model folder or name"), "steps": (int, "steps (timed rounds for step timers)"),
           "batch_size": (int, "sentences per step"), "seeds": (int, "seeds per setting"),
           "precision": (str, "mixed_precision of the runs"), "eval_every": (int, "STS-B dev every N steps"),
           "work": (Path, "runs and data (finished runs are skipped on a rerun)"),
           "results": (Path, "result JSON (the Markdown tables beside it)")}


def parser(doc: str | None, output: str | None = None, **defaults) -> argparse.ArgumentParser:
    """The docstring's first paragraph as description; ``--output`` under bench/results/; the
    shared OPTIONS named in ``defaults`` with those defaults."""
    p = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    if output is not None:
        p.add_argument("--output", type=Path, default=RESULTS / output)
    for name, default in defaults.items():
        kind, text = OPTIONS[name]
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=default, help=text)
    return p


def load_results(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8")) if Path(path).is_file() else {}


def need_file(path: Path, fix: str = "set HNCSE_DATA_DIR or pass --corpus") -> None:
    if not Path(path).is_file():
        print(f"error: {Path(path).name} not found: {path} ({fix})", file=sys.stderr)
        raise SystemExit(2)


def cpu_only(device: str = "cpu") -> None:
    """Hide GPUs for a CPU measurement (the Trainer takes a GPU when it sees one); refuse a missing CUDA."""
    import torch

    if device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    elif not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is visible", file=sys.stderr)
        raise SystemExit(2)


def random_bert(out: Path, hidden: int, layers: int) -> str:
    """A random BERT (seed 0, MiniLM's tokenizer, hidden/64 heads, FFN 4 x hidden, 512 positions, no pooler)."""
    return build_tiny_bert(out, hidden, layers, heads=max(1, hidden // 64), ffn=4 * hidden, positions=512)


def shards_of(sentences: list[str], out: Path) -> str:
    """``sentences`` as a folder of shards, the form the Trainer reads."""
    from hncse_dist.data import write_shards

    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "sentences.txt").write_text("\n".join(sentences) + "\n", encoding="utf-8")
    write_shards([str(Path(out) / "sentences.txt")], str(Path(out) / "shards"), 10_000, progress=False)
    return str(Path(out) / "shards")


def bench_trainer(out_dir: Path, **overrides):
    """The product's ``Trainer`` with every part a run has, minus evaluation, logs, checkpoints
    and progress bar: ``trainer.train_step`` is the step a training run takes."""
    from hncse_dist.config import TrainConfig
    from hncse_dist.train import Trainer

    cfg = dict(output_dir=str(out_dir), max_steps=10**6, num_workers=0, eval_file=None, save_every=0, save_best=False,
               log_every=10**9, report_to="none", progress=False, overwrite=True, peak_flops=1.0)
    return Trainer(TrainConfig(**{**cfg, **overrides}))


def train_step(trainer, group) -> float:
    """One ``trainer.train_step(group)``; returns its mean loss (one host read) and empties the metrics window."""
    if not trainer.train_step(group).stepped:
        raise FloatingPointError(f"non-finite loss ({trainer.cfg.objective})")
    loss = float(trainer.window.sums["loss"]) / trainer.window.micro
    trainer.window.reset()
    return loss


def sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":  # CUDA runs asynchronously: wait before reading the clock
        torch.cuda.synchronize()


def rounds(steps: dict, warmup: int, timed: int, after_round=None, log: bool = True):
    """(seconds, return values) per step over ``timed`` rounds after ``warmup``; one call of each
    step per round, the first one rotating, so a shared machine's load hits them alike. Steps
    sync the device themselves; ``after_round(timed)`` runs after each round."""
    times, values = {n: [] for n in steps}, {n: [] for n in steps}
    names = list(steps)
    for r in range(warmup + timed):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            value = steps[name]()
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
                values[name].append(value)
        if after_round is not None:
            after_round(r >= warmup)
        if log:
            print(f"round {r + 1}/{warmup + timed} ({'timed' if r >= warmup else 'warm-up'}), "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)
    return times, values


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """a / b: (median of the per-round ratios, ratio of the fastest of each; other jobs only add time)."""
    return median([x / y for x, y in zip(a, b)]), min(a) / min(b)


def proc_mb(pid: int, key: str = "VmRSS", file: str = "status") -> float | None:
    """A kB field of /proc/PID/FILE in MB as metrics.memory_gb counts on CPU (kB / 1000)."""
    try:
        with open(f"/proc/{pid}/{file}") as f:
            return next((int(line.split()[1]) / 1000 for line in f if line.startswith(key + ":")), None)
    except OSError:
        return None


rss_mb = proc_mb  # rss_mb(pid): VmRSS in MB


def descendants(pid: int) -> list[int]:
    """Children (of any of the process's threads), grandchildren and so on."""
    kids = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                kids += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return kids + [g for k in kids for g in descendants(k)]


class MemorySampler:
    """While open, every ``interval`` s: the RSS of ``pid`` and of each descendant (``rss``: pid ->
    MB samples), the peak PSS of them all together (shared pages split: the machine's real use) and
    ``pid``'s own peak RSS (VmHWM; wait4's ru_maxrss would count the forking parent's pages)."""

    def __init__(self, pid: int, interval: float = 0.5):
        self.pid, self.interval, self.rss, self.peak_pss_mb, self.peak_rss_mb = pid, interval, {}, 0.0, 0.0
        self._stop, self._thread = threading.Event(), threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            pids = [self.pid, *descendants(self.pid)]
            for p in pids:
                if (mb := rss_mb(p)) is not None:
                    self.rss.setdefault(p, []).append(mb)
            self.peak_pss_mb = max(self.peak_pss_mb, sum(proc_mb(p, "Pss", "smaps_rollup") or 0.0 for p in pids))
            self.peak_rss_mb = max(self.peak_rss_mb, proc_mb(self.pid, "VmHWM") or 0.0)

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def env(threads: int | None = None) -> dict:
    """A subprocess's environment: this checkout's code, no hub, no tokenizer threads."""
    return dict(os.environ, PYTHONPATH=str(REPO_ROOT), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
                TRANSFORMERS_OFFLINE="1", **({"OMP_NUM_THREADS": str(threads)} if threads else {}))


def python(*args: str, timeout: float | None = None, threads: int | None = None) -> subprocess.CompletedProcess:
    """``python ARGS`` with this interpreter in the repository root, output captured."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO_ROOT, env=env(threads), capture_output=True,
                          text=True, timeout=timeout)


def cli(*args: str, timeout: float | None = None, threads: int | None = None) -> subprocess.CompletedProcess:
    """``hncse-dist ARGS`` with this interpreter, output captured."""
    return python("-m", "hncse_dist.cli", *args, timeout=timeout, threads=threads)


def evaluate(model: str, out: Path, tasks: str = "sts", threads: int | None = None, pooler: str | None = None) -> dict:
    """``hncse-dist eval`` into ``out`` unless it exists (default pooler: the checkpoint's own); its JSON."""
    if not Path(out).is_file():
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        proc = cli("eval", "--model", model, "--tasks", tasks, "--output", out, "--no-progress", "--data-dir",
                   data_root(), *(["--threads", threads] if threads else []), *(["--pooler", pooler] if pooler else []))
        if proc.returncode != 0:
            raise RuntimeError(f"eval of {model} failed:\n{proc.stderr[-3000:]}")
    return json.loads(Path(out).read_text())


def timed(*args: str, marks: dict[str, str] | None = None, threads: int | None = None) -> dict:
    """``python ARGS``, its output read line by line: seconds from the start to the first line matching
    each regex of ``marks``, wall and CPU seconds (wait4), its peak RSS and the peak PSS of it and its
    descendants (DataLoader workers), sampled every 0.5 s. A failure raises with the output's tail."""
    start, seen, tail = time.perf_counter(), {}, deque(maxlen=40)
    proc = subprocess.Popen([sys.executable, *map(str, args)], cwd=REPO_ROOT, env=env(threads), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    with MemorySampler(proc.pid) as memory:
        for line in proc.stdout:
            tail.append(line.rstrip())
            seen.update({k: time.perf_counter() - start for k, pattern in (marks or {}).items()
                         if k not in seen and re.search(pattern, line)})
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        raise RuntimeError(f"{args[:3]} exited {rc}:\n" + "\n".join(tail))
    return {"cmd": " ".join(map(str, args)), "wall_s": time.perf_counter() - start, "marks_s": seen,
            "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mb": memory.peak_rss_mb,
            "peak_pss_tree_mb": memory.peak_pss_mb}


def machine() -> dict:
    import torch

    return {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "load_avg": os.getloadavg(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]) + "\n"


def write(output: Path, result: dict, table: str | None = None, echo: bool = True) -> None:
    """The JSON (and the Markdown table beside it); prints the table, else the JSON (``echo``)."""
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=2, default=str) + "\n"
    Path(output).write_text(text, encoding="utf-8")
    if table is not None:
        Path(output).with_suffix(".md").write_text(table, encoding="utf-8")
    if echo:
        print(table if table is not None else text)
