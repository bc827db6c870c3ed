"""Checkpoints: Accelerate state (model, optimizer, per-rank RNG; DeepSpeed's engine files under
ZeRO) plus the trainer's own state per rank (step, scheduler, bank, data position, HNM
generator, run id).

A checkpoint counts only once rank 0 has written ``COMPLETE`` after every rank finished, so
a job killed while writing never resumes from a torn folder. A write that fails on any rank
(a full disk) fails on every rank together: the partial folder is removed, the previous
checkpoint kept.

A checkpoint is data, never code. The trainer's files load with ``torch.load(weights_only=True)``
and JSON; before Accelerate or DeepSpeed load their own files (some with full pickle), every
file of the folder is loaded once with the restricted unpickler and a short allow-list of the
classes those libraries store, and the folder is refused if any file holds anything else.
The parts must agree: one run id, one step, one world size across COMPLETE and all rank files.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import time
import zipfile
from pathlib import Path

import torch

from .config import ConfigError

MARKER = "COMPLETE"
# DeepSpeed copies its conversion scripts into every checkpoint; resuming never runs them.
_SCRIPTS = {"zero_to_fp32.py", "zero_to_torch.py"}
_LOW_SPACE = 64 << 20  # bytes: a write that fails with less than this left counts as a full disk


class CheckpointRefused(ConfigError):
    """A checkpoint that is not plain data or whose parts disagree: nothing of it was loaded."""


class CheckpointWriteError(RuntimeError):
    """Writing a checkpoint failed on some rank; raised on every rank after the partial
    folder was removed (the previous checkpoint is kept)."""


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def rank_state_name(rank: int) -> str:
    return f"hncse_rank{rank}.pt"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint folders under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if (p / MARKER).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def all_ranks(value):
    """Every rank's ``value`` (a small picklable object), in rank order; a collective."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, value)
        return out
    return [value]


def _first(values):
    return next((v for v in values if v), None)


# --- reading: plain data only ---------------------------------------------------------------


def _allowed_globals(folder: Path) -> list:
    """The non-tensor classes the libraries store: numpy's RNG state (Accelerate's
    random_states_*.pkl) and, for DeepSpeed engine folders, its ZeRO stage enum, loss scaler and
    parameter-fragment address. Nothing here runs code when rebuilt from a pickle."""
    import numpy as np

    try:
        reconstruct = np._core.multiarray._reconstruct
    except AttributeError:  # numpy < 2
        reconstruct = np.core.multiarray._reconstruct
    allowed = [reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    if any(folder.glob("*/*_model_states.pt")) or any(folder.glob("*/*_optim_states.pt")):
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        allowed += [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]
    return allowed


def _reason(err: Exception) -> str:
    text = str(err)
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if found:
        return f"it refers to {found.group(1)}, which is not checkpoint data"
    line = next((l.strip() for l in text.splitlines() if l.strip()), type(err).__name__)
    return line[:200]


def _check_file(file: Path, allowed: list) -> str | None:
    """None if ``file`` loads as plain data, else why not."""
    try:
        if file.name == MARKER or file.suffix == ".json":
            json.loads(file.read_text(encoding="utf-8"))
        elif file.name == "latest":  # DeepSpeed's tag file
            if not re.fullmatch(r"[\w.\-]{1,200}", file.read_text(encoding="utf-8").strip()):
                return "not a checkpoint tag"
        elif file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as handle:
                handle.keys()
        else:
            with torch.serialization.safe_globals(allowed):
                torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    except Exception as err:  # noqa: BLE001 - any failure means: not plain data
        return _reason(err)
    return None


def check_files(folder: Path) -> None:
    """Refuse ``folder`` unless every file in it loads as plain tensors and values."""
    folder = Path(folder)
    allowed = _allowed_globals(folder)
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        if file.name in _SCRIPTS and file.parent == folder:
            continue
        problem = _check_file(file, allowed)
        if problem:
            raise CheckpointRefused(
                f"refusing checkpoint {folder}: {file.relative_to(folder)} is not plain checkpoint data "
                f"({problem}); it is damaged or was tampered with: resume from another checkpoint"
            )


def _load_rank_state(file: Path) -> dict:
    return torch.load(file, map_location="cpu", weights_only=True)


def check_world_size(folder: Path, world_size: int) -> dict:
    """COMPLETE's record, if ``folder`` was written by ``world_size`` processes."""
    try:
        info = json.loads((Path(folder) / MARKER).read_text(encoding="utf-8"))
        int(info["world_size"]), int(info["step"])
    except Exception as err:  # noqa: BLE001
        raise CheckpointRefused(
            f"refusing checkpoint {folder}: {MARKER} is not plain checkpoint data ({_reason(err)}); "
            "it is damaged or was tampered with: resume from another checkpoint"
        ) from None
    if info["world_size"] != world_size:
        raise CheckpointRefused(
            f"{folder} was written by {info['world_size']} processes, this run has {world_size}: "
            f"resume with --nproc-per-node {info['world_size']} (the data position and the bank are per world size)"
        )
    return info


def check_parts(folder: Path, world_size: int) -> None:
    """Refuse ``folder`` unless COMPLETE and every rank's file come from one run, one step and
    ``world_size`` processes. Call after ``check_files``."""
    folder = Path(folder)
    info = check_world_size(folder, world_size)
    if (folder / "custom_checkpoint_0.pkl").exists():
        raise CheckpointRefused(
            f"refusing checkpoint {folder}: it was written by an older hncse-dist (scheduler in "
            "custom_checkpoint_0.pkl); resume it with that version or start a new run"
        )
    expected = [rank_state_name(r) for r in range(world_size)]
    present = sorted((p.name for p in folder.glob("hncse_rank*.pt")), key=lambda n: int(re.sub(r"\D", "", n) or 0))
    if present != expected:
        raise CheckpointRefused(
            f"refusing checkpoint {folder}: it holds the rank files {present}, a world of {world_size} writes "
            f"{expected}: resume from another checkpoint"
        )
    want = (info.get("run_id"), info["step"], info["world_size"])
    for name in expected:
        part = _load_rank_state(folder / name)
        got = (part.get("run_id"), part.get("step", part.get("trainer", {}).get("step")), part.get("world_size"))
        if got != want:
            raise CheckpointRefused(
                f"refusing checkpoint {folder}: {name} belongs to run {got[0]} step {got[1]} world size {got[2]}, "
                f"{MARKER} to run {want[0]} step {want[1]} world size {want[2]}: the folder mixes two runs; "
                "resume from another checkpoint"
            )


# --- writing --------------------------------------------------------------------------------


def _no_space(err: BaseException, folder: Path) -> bool:
    seen = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    # torch's writers report a full disk as "basic_ios::clear: iostream error" or
    # "unexpected pos N vs M": judge by what is left.
    try:
        return shutil.disk_usage(folder if folder.exists() else folder.parent).free < _LOW_SPACE
    except OSError:
        return False


class Checkpointer:
    """Writes and restores a run's checkpoints: Accelerate's model and optimizer state plus the
    registered stateful parts (``states``: name -> object with ``state_dict()`` and
    ``load_state_dict()``), saved and loaded symmetrically in every rank's own file.

    It owns the policy too: a checkpoint is due every ``save_every`` steps and at the last
    step (``due``); a preemption saves regardless; only the newest ``keep_last`` stay.
    ``extras``: name -> callable whose value is written but not restored (e.g. a digest)."""

    def __init__(self, root: Path, accelerator, states: dict | None = None, keep_last: int = 2,
                 run_id: str | None = None, save_every: int = 0, extras: dict | None = None):
        self.root = Path(root)
        self.acc = accelerator
        self.states = dict(states or {})
        self.extras = dict(extras or {})
        self.keep_last = keep_last
        self.run_id = run_id
        self.save_every = save_every

    def due(self, step: int, last_step: int) -> bool:
        return (self.save_every > 0 and step % self.save_every == 0) or step == last_step

    def _rank_file(self, path: Path, rank: int | None = None) -> Path:
        return path / rank_state_name(self.acc.process_index if rank is None else rank)

    def _joint(self, path: Path, failure: tuple[bool, str] | None) -> None:
        """Every rank learns whether any rank failed; if one did, the partial folder goes and
        every rank raises the same CheckpointWriteError."""
        failures = all_ranks(failure)
        if not any(failures):
            return
        rank, (no_space, reason) = next((r, f) for r, f in enumerate(failures) if f)
        if any(f and f[0] for f in failures):
            message = f"no space left on device while writing checkpoint {path.name} in {path.parent}"
        else:
            message = f"could not write checkpoint {path.name} in {path.parent} (rank {rank}: {reason})"
        if self.acc.is_main_process and not (path / MARKER).is_file():
            shutil.rmtree(path, ignore_errors=True)
        all_ranks(None)  # the folder is gone before any rank reports
        raise CheckpointWriteError(message)

    def _attempt(self, path: Path, write) -> None:
        failure = None
        try:
            write()
        except Exception as err:  # noqa: BLE001 - decided jointly below
            failure = (_no_space(err, path), _reason(err))
        self._joint(path, failure)

    def _room_for(self, path: Path):
        """Before writing, rank 0 checks the disk holds another checkpoint the size of the last
        one: a disk known to be too full fails before any rank starts writing (DeepSpeed's
        engine has barriers of its own that a rank failing mid-write would leave waiting)."""

        def check():
            previous = complete_checkpoints(self.root)
            if not self.acc.is_main_process or not previous:
                return
            need = sum(f.stat().st_size for f in previous[-1].rglob("*") if f.is_file())
            if path.exists():  # a torn folder of this step is replaced
                need -= sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            if shutil.disk_usage(self.root).free < need:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.root))

        return check

    def save(self, step: int, extra: dict | None = None) -> Path:
        path = self.root / step_dir_name(step)
        ws = self.acc.num_processes
        extra = {**{name: part.state_dict() for name, part in self.states.items()},
                 **{name: value() for name, value in self.extras.items()}, **(extra or {})}

        def prepare():
            if self.acc.is_main_process:
                (path / MARKER).unlink(missing_ok=True)
                path.mkdir(parents=True, exist_ok=True)

        def write():
            self.acc.save_state(str(path))
            torch.save({**extra, "world_size": ws, "run_id": self.run_id, "step": step}, self._rank_file(path))

        def seal():
            if self.acc.is_main_process:
                info = {"step": step, "world_size": ws, "run_id": self.run_id, "time": time.time()}
                tmp = path / f".{MARKER}.tmp"
                tmp.write_text(json.dumps(info))
                os.replace(tmp, path / MARKER)

        self._attempt(path, self._room_for(path))
        self._attempt(path, prepare)
        self._attempt(path, write)
        self._attempt(path, seal)
        if self.acc.is_main_process:
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
        """This rank's trainer state from ``path``, after every rank checked the whole folder
        (refused on all ranks together if any rank found a problem)."""
        problem = None
        try:
            check_world_size(path, self.acc.num_processes)
            check_files(path)
            check_parts(path, self.acc.num_processes)
        except ConfigError as err:
            problem = str(err)
        except Exception as err:  # noqa: BLE001 - e.g. an unreadable COMPLETE
            problem = f"refusing checkpoint {path}: {_reason(err)}"
        problem = _first(all_ranks(problem))
        if problem:
            raise CheckpointRefused(problem)
        self.acc.load_state(str(path))
        saved = _load_rank_state(self._rank_file(path))
        if "negatives" in self.states and "negatives" not in saved and "bank" in saved:
            saved["negatives"] = {"bank": saved["bank"], "generator": saved["generator"]}  # older layout
        missing = [name for name in self.states if name not in saved]
        if missing:
            raise CheckpointRefused(f"refusing checkpoint {path}: it holds no {', '.join(missing)} state "
                                    "(written by another version?)")
        for name, part in self.states.items():
            part.load_state_dict(saved[name])
        return saved


def marker_record(folder: Path) -> dict:
    """What ``COMPLETE`` records of a complete checkpoint: step, world_size, run_id, time."""
    return json.loads((Path(folder) / MARKER).read_text(encoding="utf-8"))
