"""``hncse-dist eval``: STS and transfer evaluation of a saved encoder, from the command line."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

from .data import DATA_DIR_ENV, default_data_dir
from .embed import EmbeddingTable
from ..encoder import DEFAULT_MAX_TOKENS, POOLERS
from .sts import STS_TASKS, load_sts_task, score_sts
from .transfer import TRANSFER_TASKS, ClassifierConfig, load_transfer_task, score_transfer

ALL_TASKS = STS_TASKS + TRANSFER_TASKS
TASK_GROUPS = {"sts": STS_TASKS, "transfer": TRANSFER_TASKS, "all": ALL_TASKS}
AVG_LABELS = {"sts": "STS avg", "transfer": "transfer avg"}


class EvalError(Exception):
    """A user-facing problem, reported as one line with a non-zero exit code."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hncse-dist eval",
        description="Evaluate a sentence encoder on STS (cosine Spearman) and SentEval transfer tasks.",
    )
    p.add_argument("--model", required=True, help="model folder (save_pretrained) or all-MiniLM-L6-v2")
    p.add_argument("--data-dir", default=None,
                   help=f"folder holding sts/ and transfer/ (default: ${DATA_DIR_ENV})")
    p.add_argument("--tasks", default="sts",
                   help="sts | transfer | all | comma-separated names: " + ",".join(ALL_TASKS))
    p.add_argument("--pooler", choices=POOLERS, default=None,
                   help="default: the pooler saved with the model, else cls (no MLP head at evaluation)")
    p.add_argument("--output", default=None, help="write results as JSON here")
    p.add_argument("--batch-size", type=int, default=128, help="the most sentences in an encoder batch")
    p.add_argument("--max-tokens", type=int, default=None,
                   help=f"the most token positions in an encoder batch (default {DEFAULT_MAX_TOKENS}; "
                        "a GPU gains from more)")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's; 1 is often faster on a busy machine)")
    p.add_argument("--seed", type=int, default=1111, help="seed of the transfer CV splits")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def parse_tasks(spec: str) -> tuple[list[str], list[str]]:
    """(STS tasks, transfer tasks) in canonical order; names and groups are case-insensitive."""
    canonical = {name.lower(): (name,) for name in ALL_TASKS}
    canonical.update({group: names for group, names in TASK_GROUPS.items()})
    chosen: set[str] = set()
    for item in filter(None, (part.strip() for part in spec.split(","))):
        if item.lower() not in canonical:
            valid = ", ".join(list(TASK_GROUPS) + list(ALL_TASKS))
            raise EvalError(f"unknown task {item!r}; valid tasks: {valid}")
        chosen.update(canonical[item.lower()])
    if not chosen:
        raise EvalError("no task given to --tasks")
    return [t for t in STS_TASKS if t in chosen], [t for t in TRANSFER_TASKS if t in chosen]


def resolve_data_dir(value: str | None) -> Path:
    path = Path(value) if value else default_data_dir()
    if path is None:
        raise EvalError(f"no data folder: pass --data-dir or set ${DATA_DIR_ENV}")
    if not path.is_dir():
        raise EvalError(f"data folder {path} does not exist (expected DATA_DIR/sts/... and DATA_DIR/transfer/...)")
    return path


def load_tasks(data_dir: Path, sts_names: Sequence[str], transfer_names: Sequence[str]) -> tuple[list, list]:
    try:
        return ([load_sts_task(data_dir, n) for n in sts_names],
                [load_transfer_task(data_dir, n) for n in transfer_names])
    except (OSError, ValueError, IndexError) as err:
        raise EvalError(_one_line(err)) from err


def load_encoder(model: str, pooler: str | None, device: str | None, threads: int | None = None):
    import torch

    from hncse_dist.encoder import Encoder

    if threads:
        torch.set_num_threads(threads)
    try:
        encoder = Encoder.from_pretrained(model, pooler=pooler)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return encoder.to(torch.device(device)).eval()
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise EvalError(f"cannot load model {model!r}: {_one_line(err)}") from err


def _one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def markdown_table(results: dict) -> str:
    rows = ["| task | score |", "|:--|--:|"]
    for section in ("sts", "transfer"):
        part = results.get(section)
        if not part:
            continue
        for name, value in part.items():
            if name in ("avg", "details", "MRPC_F1"):
                continue
            shown = f"{value:.2f}"
            if name == "MRPC" and "MRPC_F1" in part:
                shown += f" (F1 {part['MRPC_F1']:.2f})"
            rows.append(f"| {name} | {shown} |")
        rows.append(f"| **{AVG_LABELS[section]}** | **{part['avg']:.2f}** |")
    return "\n".join(rows)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> dict:
    for flag, value in (("--batch-size", args.batch_size), ("--max-tokens", args.max_tokens)):
        if value is not None and value < 1:
            raise EvalError(f"{flag} {value}: must be at least 1")
    sts_names, transfer_names = parse_tasks(args.tasks)
    data_dir = resolve_data_dir(args.data_dir)
    # Data problems surface before the (slow) model load.
    sts_tasks, transfer_tasks = load_tasks(data_dir, sts_names, transfer_names)
    encoder = load_encoder(args.model, args.pooler, args.device, args.threads)
    sentences = (s for task in sts_tasks + transfer_tasks for s in task.sentences())
    start = time.perf_counter()
    table = EmbeddingTable.encode(encoder, sentences, args.batch_size, args.max_length,
                                  progress=not args.no_progress, max_tokens=args.max_tokens)
    results: dict = {
        "model": args.model, "pooler": encoder.pooler, "data_dir": str(data_dir),
        "batch_size": args.batch_size, "max_tokens": args.max_tokens or DEFAULT_MAX_TOKENS,
        "max_length": args.max_length,
        "sentences_encoded": len(table), "encode_seconds": round(time.perf_counter() - start, 2),
    }
    _log(f"encoded {len(table)} distinct sentences in {results['encode_seconds']} s")
    if sts_tasks:
        results["sts"] = score_sts(sts_tasks, table)
    if transfer_tasks:
        config = ClassifierConfig(seed=args.seed)
        results["transfer"] = score_transfer(transfer_tasks, table, config, log=_log)
    return results


def eval_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``hncse-dist eval``; returns the process exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse already printed usage / error
        return int(exit_.code or 0)
    try:
        results = run(args)
    except EvalError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
    print(markdown_table(results))
    return 0
