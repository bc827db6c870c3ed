"""What the training metrics mean, in one place: metric names, the steady-state throughput
(warm-up excluded), model FLOPs and MFU, and the plain progress line printed when there is no
terminal (sbatch logs)."""

from __future__ import annotations

import json
import math
import resource
import time
from pathlib import Path

import torch

STSB_DEV_KEY = "eval/stsb_dev_spearman"
# Steps whose throughput is left out of averages (start-up, allocator and thread-pool warm-up).
WARMUP_STEPS = 5

# Dense peak FLOP/s per GPU (vendor datasheets, without sparsity), by a substring of the
# device name, for bf16/fp16 and for fp32 (TF32 where the hardware uses it for fp32 matmuls).
GPU_PEAKS = (
    ("H200", 989e12, 494e12), ("H100", 989e12, 494e12), ("GH200", 989e12, 494e12),
    ("A100", 312e12, 156e12), ("A800", 312e12, 156e12), ("L40S", 362e12, 183e12),
    ("A6000", 155e12, 77e12), ("A10", 125e12, 62e12), ("L4", 121e12, 60e12),
    ("4090", 165e12, 83e12), ("3090", 71e12, 36e12), ("V100", 125e12, 15.7e12), ("T4", 65e12, 8.1e12),
)


def steady_rate(records: list[dict], key: str = "sentences_per_s") -> float | None:
    """Mean of ``key`` over log records after the warm-up steps (all records if none is later)."""
    rates = [r[key] for r in records if isinstance(r.get(key), (int, float))]
    steady = [r[key] for r in records if isinstance(r.get(key), (int, float)) and r.get("step", 0) > WARMUP_STEPS]
    use = steady or rates
    return sum(use) / len(use) if use else None


class FlopsModel:
    """Training FLOPs of a transformer encoder: 6 x (non-embedding parameters) per real token
    (forward + backward), plus attention scores and values on the padded length
    (12 x layers x hidden x length^2 per sequence). The same count as bench/throughput.py's MFU."""

    def __init__(self, model: torch.nn.Module):
        embedding = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
        self.dense_params = sum(p.numel() for p in model.parameters()) - embedding
        backbone_cfg = getattr(getattr(model, "backbone", model), "config", None)
        self.layers = getattr(backbone_cfg, "num_hidden_layers", 0) or 0
        self.hidden = getattr(backbone_cfg, "hidden_size", 0) or 0

    def step(self, real_tokens: int, sequences: int, seq_len: int) -> float:
        return 6.0 * self.dense_params * real_tokens + 12.0 * self.layers * self.hidden * seq_len**2 * sequences


def measure_cpu_peak(dtype: torch.dtype = torch.float32, n: int = 1024, reps: int = 3) -> float:
    """FLOP/s of a square matmul on this CPU (best of ``reps``): MFU's denominator on CPU."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def peak_flops(device: torch.device, mixed_precision: str, override: float = 0.0) -> float | None:
    """Peak FLOP/s of one device: ``override`` when set, the datasheet for known GPUs, a measured
    matmul on CPU; None for an unknown GPU (MFU is then not logged)."""
    if override > 0:
        return override
    half = mixed_precision in ("bf16", "fp16")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, low, full in GPU_PEAKS:
            if key in name:
                return low if half else full
        return None
    if device.type == "cpu":
        return measure_cpu_peak(torch.bfloat16 if half else torch.float32)
    return None


def memory_gb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocations on GPU, resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports KiB


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def progress_line(step: int, total: int, values: dict, eta_s: float) -> str:
    """One line per log window for logs without a terminal (no progress bar there)."""
    parts = [f"step {step}/{total}", f"loss {values['loss']:.4f}", f"lr {values['lr']:.2e}",
             f"{values['sentences_per_s']:.0f} sent/s", f"{values['tokens_per_s']:.0f} tok/s"]
    if "mfu" in values:
        parts.append(f"MFU {100 * values['mfu']:.1f}%")
    parts += [f"ETA {_duration(eta_s)}", f"mem {values['memory_gb']:.2f} GB"]
    if values.get("nonfinite_skips"):
        parts.append(f"skipped {values['nonfinite_skips']}")
    return " | ".join(parts)


TRACKERS = ("tensorboard", "wandb", "mlflow")
_TRACKER_PACKAGES = {"wandb": "wandb", "mlflow": "mlflow"}


def parse_report_to(value: str) -> list[str]:
    """``report_to`` (comma-separated, or none) as a list of trackers; the message names the fix."""
    import importlib.util

    names = [v.strip() for v in str(value).split(",") if v.strip() and v.strip() != "none"]
    for name in names:
        if name not in TRACKERS:
            raise ValueError(f"report_to={value!r}: unknown tracker {name!r}; use any of {', '.join(TRACKERS)} or none")
        package = _TRACKER_PACKAGES.get(name)
        if package and importlib.util.find_spec(package) is None:
            raise ValueError(f"report_to={value!r}: {package} is not installed; Fix: pip install {package}, "
                             "or report_to=tensorboard")
    return names


def hparams_of(config: dict) -> dict:
    """Config values TensorBoard's HParams accepts (numbers, strings, booleans)."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.items()}


class MetricsLog:
    """metrics.jsonl and the chosen trackers on the main process; no-ops elsewhere.

    TensorBoard is written directly (scalars under ``tb/``, the run's hyperparameters with its
    final metrics in the HParams tab); wandb / mlflow go through Accelerate's trackers."""

    def __init__(self, out_dir: Path, enabled: bool, trackers: list[str] | tuple[str, ...] = ("tensorboard",),
                 accelerator=None):
        self.enabled = enabled
        self.tb = None
        self.others = accelerator if enabled and any(t != "tensorboard" for t in trackers) else None
        if enabled:
            if "tensorboard" in trackers:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(out_dir) / "tb"))
            self.jsonl = open(Path(out_dir) / "metrics.jsonl", "a", buffering=1)

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
        if self.others is not None:
            self.others.log(values, step=step)
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")

    def hparams(self, config: dict, results: dict) -> None:
        """The run's hyperparameters next to its final metrics (sweeps and scaling studies)."""
        if not self.enabled or self.tb is None:
            return
        metrics = {f"hparam/{k}": float(v) for k, v in results.items() if isinstance(v, (int, float))}
        self.tb.add_hparams(hparams_of(config), metrics, run_name=".")

    def close(self) -> None:
        if self.enabled:
            if self.tb is not None:
                self.tb.close()
            self.jsonl.close()


def release_free_memory() -> None:
    """Hand memory that glibc's allocator keeps after frees back to the system.

    Batches of varying shape (the padding-free forward packs a different number of tokens every
    step) leave the heap fragmented: without this the resident size of a CPU run creeps up by
    hundreds of MB over a few thousand steps although nothing is live (bench/memory_long.py).
    A no-op where glibc is not the allocator."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            import ctypes

            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM = None


class MetricsWindow:
    """What happened since the last log line, and when logging and evaluation fall due.

    Per micro-step the trainer adds the loss and the objective's statistics (device tensors:
    no host sync) and the batch's real tokens and FLOPs (host numbers from the data loader);
    ``values`` turns a window into one record (means over its micro-steps, averaged over
    ranks, rates over its training time). Evaluation and checkpoints are not training time:
    ``restart_clock`` after them."""

    def __init__(self, log_every: int, eval_every: int, total_steps: int):
        self.log_every, self.eval_every, self.total = max(1, log_every), eval_every, total_steps
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.steps = self.micro = self.tokens = 0
        self.flops = 0.0
        self.sums: dict[str, torch.Tensor | float] = {}

    def restart_clock(self) -> None:
        """Called between steps after non-training work: the window counts training time only."""
        if self.steps == 0:
            self.reset()

    def add(self, loss: torch.Tensor, stats: dict, tokens: int, flops: float) -> None:
        for k, v in stats.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.sums["loss"] = self.sums.get("loss", 0.0) + loss.detach()
        self.micro += 1
        self.tokens += tokens
        self.flops += flops

    def log_due(self, step: int) -> bool:
        return step % self.log_every == 0 or step == self.total

    def eval_due(self, step: int) -> bool:
        return (self.eval_every > 0 and step % self.eval_every == 0) or step == self.total

    def values(self, acc, sentences_per_micro: int, peak: float | None) -> dict:
        """The window's record: every rank calls it (the statistics are averaged over ranks)."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        micro = max(self.micro, 1)
        out = {k: float(acc.reduce(torch.as_tensor(v, device=acc.device) / micro, "mean"))
               for k, v in sorted(self.sums.items())}
        out["sentences_per_s"] = self.micro * sentences_per_micro / elapsed
        out["tokens_per_s"] = self.tokens * acc.num_processes / elapsed
        if peak:
            out["mfu"] = self.flops / elapsed / peak
        return out

    def eta_s(self, step: int) -> float:
        return (self.total - step) * (time.perf_counter() - self.start) / max(self.steps, 1)
