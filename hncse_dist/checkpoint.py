"""Checkpoints: Accelerate state (model, optimizer, scheduler, scaler, per-rank RNG) plus the
trainer's own state per rank (step, bank, data position, HNM generator).

A checkpoint counts only once rank 0 has written ``COMPLETE`` after every rank finished, so
a job killed while writing never resumes from a torn folder.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

MARKER = "COMPLETE"


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint folders under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if (p / MARKER).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


class Checkpointer:
    def __init__(self, root: Path, accelerator, keep_last: int = 2):
        self.root = Path(root)
        self.acc = accelerator
        self.keep_last = keep_last

    def _rank_file(self, path: Path, rank: int | None = None) -> Path:
        return path / f"hncse_rank{self.acc.process_index if rank is None else rank}.pt"

    def save(self, step: int, extra: dict) -> Path:
        path = self.root / step_dir_name(step)
        if self.acc.is_main_process:
            (path / MARKER).unlink(missing_ok=True)
            path.mkdir(parents=True, exist_ok=True)
        self.acc.wait_for_everyone()
        self.acc.save_state(str(path))
        torch.save({**extra, "world_size": self.acc.num_processes}, self._rank_file(path))
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            info = {"step": step, "world_size": self.acc.num_processes, "time": time.time()}
            (path / MARKER).write_text(json.dumps(info))
            self._rotate()
        self.acc.wait_for_everyone()
        return path

    def _rotate(self) -> None:
        if self.keep_last <= 0:
            return
        for old in complete_checkpoints(self.root)[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def resolve(self, spec: str) -> Path | None:
        """'latest' -> the newest complete checkpoint (rank 0 decides for all), or a folder."""
        from accelerate.utils import broadcast_object_list

        choice = None
        if self.acc.is_main_process:
            if spec == "latest":
                found = complete_checkpoints(self.root)
                choice = str(found[-1]) if found else None
            elif (Path(spec) / MARKER).is_file():
                choice = spec
        box = [choice]
        broadcast_object_list(box)
        return None if box[0] is None else Path(box[0])

    def load(self, path: Path) -> dict:
        info = json.loads((path / MARKER).read_text())
        if info["world_size"] != self.acc.num_processes:
            raise RuntimeError(
                f"{path} was written by {info['world_size']} processes, this run has {self.acc.num_processes}: "
                "resume with the same number of processes (the data position and bank are per world size)"
            )
        self.acc.load_state(str(path))
        return torch.load(self._rank_file(path), map_location="cpu", weights_only=False)
