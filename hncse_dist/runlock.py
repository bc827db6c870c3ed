"""One run per output folder, and a run record that holds each step once.

Rank 0 holds an exclusive ``flock`` on ``OUTPUT_DIR/run.lock`` for the run's lifetime; the
kernel releases it when the process ends, however it ends. A second run on the same folder is
refused (exit 2) with the holder's host, PID and run id, which the holder writes into the file.
(``flock`` is honoured across hosts on NFSv4 and Lustre; on other shared file systems it may
only exclude runs on the same host.)

After a resume the records of the steps past the checkpoint are superseded: they are dropped
from metrics.jsonl (atomically) before the resumed run logs them again.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import socket
import time
from pathlib import Path

from .checkpoint import all_ranks
from .config import ConfigError

LOCK_NAME = "run.lock"


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(4)


class RunLock:
    """An exclusive lock on ``out_dir`` held until ``release`` or the end of the process."""

    def __init__(self, out_dir: Path, run_id: str):
        self.path = Path(out_dir) / LOCK_NAME
        self.fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder()
            os.close(self.fd)
            self.fd = None
            raise ConfigError(
                f"output_dir {out_dir} is in use by another run ({holder}): wait for it to end, "
                "or choose another output_dir"
            ) from None
        record = {"host": socket.gethostname(), "pid": os.getpid(), "run_id": run_id,
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, (json.dumps(record) + "\n").encode(), 0)

    def _holder(self) -> str:
        try:
            rec = json.loads(os.pread(self.fd, 4096, 0).decode())
            return f"host {rec['host']}, PID {rec['pid']}, run {rec['run_id']}"
        except (ValueError, KeyError, OSError):
            return "holder not recorded yet"

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor drops the flock
            self.fd = None


def claim_output_dir(acc, out_dir: Path) -> tuple[str, RunLock | None]:
    """(run id, lock): rank 0 takes the lock and picks the run id; every rank gets the id, or
    every rank raises the same ConfigError if the folder is in use."""
    lock, problem, run_id = None, None, None
    if acc.is_main_process:
        run_id = new_run_id()
        try:
            lock = RunLock(out_dir, run_id)
        except ConfigError as err:
            problem = str(err)
    shared = all_ranks((run_id, problem))[0]
    if shared[1]:
        raise ConfigError(shared[1])
    return shared[0], lock


def drop_records_after(path: Path, step: int) -> int:
    """Keep only the records of steps <= ``step`` in the JSON-lines file ``path`` (and drop a
    torn last line); the file is replaced atomically. Returns how many records were dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] > step:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(l + "\n" for l in kept))
        os.replace(tmp, path)
    return dropped
