"""The output folder belongs to one run: a new run never writes over another run's records.

A folder that holds a run (metrics, checkpoints or exports) is refused unless the new run
continues it (``resume=``) or the user asks to replace it (``overwrite=true``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .config import ConfigError

RECORDS = ("metrics.jsonl", "checkpoints", "final", "best", "summary.json")
REPLACED = (*RECORDS, "tb", "config.json")
# Keys that do not change what a run computes (where it is shown, how it is resumed).
NOT_THE_RUN = {"resume", "progress", "overwrite", "report_to", "run_name", "output_dir"}


def holds_a_run(out_dir: Path) -> bool:
    for name in RECORDS:
        path = out_dir / name
        if path.is_file() and path.stat().st_size > 0:
            return True
        if path.is_dir() and any(path.iterdir()):
            return True
    return False


def config_changes(old: dict, new: dict) -> list[str]:
    keys = sorted((set(old) | set(new)) - NOT_THE_RUN)
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def claim_output_dir(out_dir: Path, new_config: dict, resume: str | None, overwrite: bool, is_main: bool) -> None:
    """Refuse (ConfigError) to start a fresh run in a folder holding another one; with
    ``overwrite`` the main process removes the old run's records first."""
    if resume is not None or not holds_a_run(out_dir):
        return
    if overwrite:
        if is_main:
            for name in REPLACED:
                path = out_dir / name
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
        return
    try:
        old = json.loads((out_dir / "config.json").read_text())
    except (OSError, ValueError):
        old = None
    if old is None:
        what = "the records of an earlier run"
    else:
        changes = config_changes(old, new_config)
        shown = "; ".join(changes[:4]) + (f"; and {len(changes) - 4} more" if len(changes) > 4 else "")
        what = f"another run (config differs in {shown})" if changes else "an earlier run of this config"
    raise ConfigError(
        f"output_dir={out_dir} already holds {what}. Fix: resume=latest to continue it, "
        "output_dir=NEW_DIR for a new run, or overwrite=true to replace it"
    )
