"""`hncse-dist report`: compare training runs (scaling studies) in a table and a figure.

    hncse-dist report runs/n1 runs/n2 runs/n4 --output reports/scaling

reads every run directory's ``summary.json`` and ``metrics.jsonl`` and writes
``PREFIX.md`` (markdown table), ``PREFIX.csv`` and ``PREFIX.png`` (left: sentences/s and
scaling efficiency against the number of processes; right: STS-B dev Spearman against
steps, one line per run).

Scaling efficiency of a run = (its sentences/s per process) / (sentences/s per process of
the baseline), the baseline being the first-listed run with the smallest world size.
1.0 means perfectly linear scaling.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .metrics import STSB_DEV_KEY as STSB_KEY, steady_rate

COLUMNS = (
    "run", "world_size", "global_batch", "steps", "sentences_per_s", "scaling_efficiency",
    "final_loss", "best_stsb_dev",
)
MD_HEADERS = (
    "run", "world size", "global batch", "steps", "sentences/s", "scaling efficiency",
    "final loss", "best STS-B dev",
)


class ReportError(Exception):
    """A run directory cannot be reported on; the message names the file and the fix."""


@dataclass
class RunResult:
    name: str
    path: Path
    world_size: int
    global_batch: int | None
    steps: int | None
    sentences_per_s: float | None
    final_loss: float | None
    best_stsb_dev: float | None
    stsb_curve: list[tuple[int, float]] = field(default_factory=list)
    scaling_efficiency: float | None = None
    nodes: int | None = None  # summary.json of runs that record where they ran
    device: str | None = None

    @property
    def placement(self) -> str | None:
        """'2 nodes x 2 cpu' (None for runs that do not record their nodes)."""
        if self.nodes is None:
            return None
        per_node = self.world_size // self.nodes if self.world_size % self.nodes == 0 else "?"
        return f"{self.nodes} node{'s' if self.nodes != 1 else ''} x {per_node} {self.device or '?'}"


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl rows; a torn last line (job killed mid-write) is skipped."""
    rows = []
    with path.open() as f:
        lines = f.read().splitlines()
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if lineno == len(lines):
                continue
            raise ReportError(f"{path}:{lineno}: not valid JSON ({exc})") from exc
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _number(value) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _last(rows: list[dict], key: str):
    for row in reversed(rows):
        if _number(row.get(key)) is not None:
            return row[key]
    return None


def load_run(run_dir: str | os.PathLike, name: str | None = None) -> RunResult:
    """Summary of one run; values missing from summary.json are recomputed from metrics."""
    path = Path(run_dir)
    if not path.is_dir():
        raise ReportError(f"{path}: not a directory (expected a run's output_dir)")
    summary_path, metrics_path = path / "summary.json", path / "metrics.jsonl"
    for required in (summary_path, metrics_path):
        if not required.is_file():
            raise ReportError(
                f"{required}: missing; is {path} the output_dir of a finished run? "
                "(summary.json is written when training ends)"
            )
    try:
        summary = json.loads(summary_path.read_text())
    except json.JSONDecodeError as exc:
        raise ReportError(f"{summary_path}: not valid JSON ({exc})") from exc
    if not isinstance(summary, dict):
        raise ReportError(f"{summary_path}: expected a JSON object")
    metrics = read_metrics(metrics_path)
    train_rows = [r for r in metrics if _number(r.get("loss")) is not None]

    # Per step keep the last value: a resumed run may log a step twice.
    stsb_by_step: dict[int, float] = {}
    for row in metrics:
        value, step = _number(row.get(STSB_KEY)), _number(row.get("step"))
        if value is not None and step is not None:
            stsb_by_step[int(step)] = value
    stsb_curve = sorted(stsb_by_step.items())

    world_size = _number(summary.get("world_size"))
    if world_size is None:
        world_size = _number(_last(train_rows, "world_size"))
    if world_size is None or world_size < 1:
        raise ReportError(f"{summary_path}: no world_size (also not in {metrics_path.name})")

    sentences_per_s = _number(summary.get("sentences_per_s"))
    if sentences_per_s is None:
        sentences_per_s = steady_rate(train_rows)

    best = _number(summary.get("best_stsb_dev"))
    if best is None and stsb_curve:
        best = max(v for _, v in stsb_curve)

    global_batch = _number(summary.get("global_batch"))
    if global_batch is None:
        global_batch = _number(_last(train_rows, "global_batch"))
    steps = _number(summary.get("steps"))
    if steps is None:
        steps = _number(_last(train_rows, "step"))
    final_loss = _number(summary.get("final_loss"))
    if final_loss is None:
        final_loss = _number(_last(train_rows, "loss"))

    return RunResult(
        name=name or path.resolve().name,
        path=path,
        world_size=int(world_size),
        global_batch=None if global_batch is None else int(global_batch),
        steps=None if steps is None else int(steps),
        sentences_per_s=sentences_per_s,
        final_loss=final_loss,
        best_stsb_dev=best,
        stsb_curve=stsb_curve,
        nodes=None if _number(summary.get("nodes")) is None else int(summary["nodes"]),
        device=summary.get("device") if isinstance(summary.get("device"), str) else None,
    )


def _unique_names(run_dirs: list[str]) -> list[str]:
    """Directory names, or longer path tails where two runs share a name."""
    parts = [Path(d).resolve().parts for d in run_dirs]
    depth = 1
    while True:
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names) or depth >= max(len(p) for p in parts):
            return names
        depth += 1


def add_scaling_efficiency(runs: list[RunResult]) -> RunResult | None:
    """Set each run's scaling_efficiency against the baseline (first run of the smallest
    world size that has a throughput); returns the baseline."""
    measured = [r for r in runs if r.sentences_per_s]
    if not measured:
        return None
    smallest = min(r.world_size for r in measured)
    base = next(r for r in measured if r.world_size == smallest)
    per_process_base = base.sentences_per_s / base.world_size
    for run in runs:
        if run.sentences_per_s is not None:
            run.scaling_efficiency = (run.sentences_per_s / run.world_size) / per_process_base
    return base


def _fmt(value, digits: int) -> str:
    if value is None:
        return "–"
    if isinstance(value, (int, str)):
        return str(value)
    return f"{value:.{digits}f}"


def _has_placement(runs: list[RunResult]) -> bool:
    return any(r.nodes is not None for r in runs)


def _columns(runs: list[RunResult]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(keys, markdown headers): nodes and device only when some run recorded them."""
    if _has_placement(runs):
        return COLUMNS + ("nodes", "device"), MD_HEADERS + ("nodes", "device")
    return COLUMNS, MD_HEADERS


def table_rows(runs: list[RunResult]) -> list[dict]:
    rows = [
        {
            "run": r.name, "world_size": r.world_size, "global_batch": r.global_batch,
            "steps": r.steps, "sentences_per_s": r.sentences_per_s,
            "scaling_efficiency": r.scaling_efficiency, "final_loss": r.final_loss,
            "best_stsb_dev": r.best_stsb_dev,
        }
        for r in runs
    ]
    if _has_placement(runs):
        for row, r in zip(rows, runs):
            row.update(nodes=r.nodes, device=r.device)
    return rows


def write_markdown(runs: list[RunResult], base: RunResult | None, path: Path) -> None:
    digits = {"sentences_per_s": 1, "scaling_efficiency": 2, "final_loss": 4, "best_stsb_dev": 4}
    columns, headers = _columns(runs)
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|",
    ]
    for row in table_rows(runs):
        cells = [str(row["run"]).replace("|", "\\|")]
        cells += [_fmt(row[c], digits.get(c, 0)) for c in columns[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if base is not None:
        lines.append(
            f"Scaling efficiency = (sentences/s ÷ world size) ÷ ({base.sentences_per_s:.1f} ÷ "
            f"{base.world_size}) of the baseline run `{base.name}`; 1.00 is linear scaling."
        )
    lines.append("sentences/s: mean over the steps after warm-up (summary.json); "
                 "best STS-B dev: highest Spearman on the STS-B dev set during training.")
    path.write_text("\n".join(lines) + "\n")


def write_csv(runs: list[RunResult], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=_columns(runs)[0])
        writer.writeheader()
        for row in table_rows(runs):
            writer.writerow({k: "" if v is None else v for k, v in row.items()})


FIGSIZE_IN = (12.0, 4.5)
DPI = 100  # -> 1200 x 450 pixels


def write_plot(runs: list[RunResult], base: RunResult | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=FIGSIZE_IN, dpi=DPI)

    measured = sorted((r for r in runs if r.sentences_per_s is not None),
                      key=lambda r: (r.world_size, r.global_batch or 0))
    if measured:
        xs = [r.world_size for r in measured]
        ticks = sorted(set(xs))
        # Efficiency as translucent bars on a second axis, behind the throughput lines.
        eff = left.twinx()
        effs = [100 * r.scaling_efficiency for r in measured]
        eff.bar(xs, effs, width=[0.35 * x for x in xs], color="tab:orange", alpha=0.25,
                label="scaling efficiency")
        for x, e in zip(xs, effs):
            eff.text(x, e - 2, f"{e:.0f}%", ha="center", va="top", fontsize=8, color="tab:orange")
        eff.set_ylim(0, 1.4 * max(100, max(effs)))  # head room for the legend row
        eff.set_yticks(range(0, int(max(100, max(effs))) + 1, 20))
        eff.set_ylabel("scaling efficiency (%)", color="tab:orange")
        eff.tick_params(axis="y", colors="tab:orange")
        left.set_zorder(eff.get_zorder() + 1)
        left.patch.set_visible(False)

        left.plot(xs, [r.sentences_per_s for r in measured], "o-", color="tab:blue",
                  label="sentences/s")
        if base is not None:
            per_proc = base.sentences_per_s / base.world_size
            left.plot(ticks, [per_proc * x for x in ticks], "--", color="tab:blue", alpha=0.45,
                      label="linear scaling")
        for r in measured:  # left of the point: the linear-scaling line runs above-right
            label = r.name if r.placement is None else f"{r.name}: {r.placement}"
            left.annotate(label, (r.world_size, r.sentences_per_s), textcoords="offset points",
                          xytext=(-6, 4), ha="right", fontsize=7, color="dimgray")
        left.set_xscale("log", base=2)
        left.set_xticks(ticks, [str(t) for t in ticks])
        left.minorticks_off()
        if len(ticks) > 1:
            left.set_xlim(ticks[0] / 1.6, ticks[-1] * 1.6)
        lines, labels = left.get_legend_handles_labels()
        bars, bar_labels = eff.get_legend_handles_labels()
        left.legend(lines + bars, labels + bar_labels, loc="upper center", ncol=3, fontsize=8)
        top = max(r.sentences_per_s for r in measured)
        if base is not None:
            top = max(top, per_proc * ticks[-1])
        left.set_ylim(0, top * 1.35)  # head room for the legend row
    else:
        left.text(0.5, 0.5, "no throughput in summary.json", ha="center", va="center",
                  transform=left.transAxes)
    devices = sorted({r.device for r in runs if r.device})
    left.set_xlabel("processes" + (f" ({', '.join(devices)})" if devices else " (GPUs)"))
    left.set_ylabel("sentences/s", color="tab:blue")
    left.set_title("Throughput and scaling efficiency")
    left.grid(alpha=0.3)

    plotted = False
    for r in runs:
        if r.stsb_curve:
            steps, values = zip(*r.stsb_curve)
            right.plot(steps, values, "o-", markersize=3,
                       label=f"{r.name} (world {r.world_size}, batch {r.global_batch})")
            plotted = True
    if plotted:
        from matplotlib.ticker import MaxNLocator

        right.xaxis.set_major_locator(MaxNLocator(integer=True))
        right.legend(fontsize=8, loc="lower right")
    else:
        right.text(0.5, 0.5, f"no {STSB_KEY} in metrics.jsonl", ha="center", va="center",
                   transform=right.transAxes)
    right.set_xlabel("step")
    right.set_ylabel("STS-B dev Spearman")
    right.set_title("STS-B dev during training")
    right.grid(alpha=0.3)

    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def write_report(run_dirs: list[str], prefix: str | os.PathLike) -> dict[str, Path]:
    """Write PREFIX.md/.csv/.png for the runs; returns the paths by suffix."""
    if not run_dirs:
        raise ReportError("no run directories given")
    runs = [load_run(d, name) for d, name in zip(run_dirs, _unique_names(run_dirs))]
    runs.sort(key=lambda r: r.world_size)  # stable: keeps the given order within a size
    base = add_scaling_efficiency(runs)
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    paths = {ext: prefix.with_name(prefix.name + "." + ext) for ext in ("md", "csv", "png")}
    write_markdown(runs, base, paths["md"])
    write_csv(runs, paths["csv"])
    write_plot(runs, base, paths["png"])
    return paths


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hncse-dist report",
        description="Table (markdown, CSV) and figure comparing runs, e.g. a scaling study.",
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="output_dir of a run (with summary.json and metrics.jsonl)")
    parser.add_argument("--output", "-o", default="report", metavar="PREFIX",
                        help="writes PREFIX.md, PREFIX.csv and PREFIX.png (default: report)")
    return parser


def report_main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        paths = write_report(args.run_dirs, args.output)
    except ReportError as exc:
        print(f"hncse-dist report: error: {exc}", file=sys.stderr)
        return 2
    for path in paths.values():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(report_main(sys.argv[1:]))
