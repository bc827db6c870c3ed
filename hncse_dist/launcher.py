"""Local multi-process launch for ``hncse-dist train --nproc-per-node N``.

One worker process per rank, started directly (not through torchrun), so that:
- SIGTERM / SIGINT / SIGUSR1 sent to the launcher are forwarded to every worker (each
  checkpoints and exits);
- the workers stay in the launcher's process group (a signal to the group reaches them) and
  get a parent-death signal: killing the launcher with SIGKILL takes them down too;
- the launcher's exit code is the workers' own (75 after a preemption checkpoint, 130 after
  Ctrl-C, the failing rank's code otherwise);
- a rank that dies ends the job at once: the others are killed instead of waiting in a
  collective for a peer that is gone.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP)
PR_SET_PDEATHSIG = 1
OK_CODES = (0, 75, 130)  # finished / checkpointed after a preemption signal / after Ctrl-C


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (the rendezvous binds it moments later)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Have the kernel send ``sig`` to this process when its parent dies (even by SIGKILL).
    The launcher's ranks get SIGTERM (they checkpoint and exit instead of training on as
    orphans); DataLoader workers and their fork server get SIGKILL (they hold nothing to save)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, sig)
    except OSError:  # not Linux: the process group still carries group signals
        return
    if os.getppid() == 1:  # the parent died before the call took effect
        os.kill(os.getpid(), sig)


def worker_env(rank: int, nproc: int, port: int, base: dict | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
               GROUP_RANK="0", NODE_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return env


def _code(returncode: int) -> int:
    """Popen's -N (killed by signal N) as the shell's 128+N."""
    return 128 - returncode if returncode < 0 else returncode


def launch(nproc: int, argv: list[str], poll_s: float = 0.1) -> int:
    """Run ``hncse-dist train ARGV`` as ``nproc`` local ranks; returns the job's exit code."""
    port = free_port()
    print(f"hncse-dist: starting {nproc} processes (rendezvous 127.0.0.1:{port})", file=sys.stderr, flush=True)
    cmd = [sys.executable, "-m", "hncse_dist.cli", "train", *argv]
    workers: list[subprocess.Popen] = []
    received: list[int] = []

    def forward(signum, frame) -> None:
        received.append(signum)
        for w in workers:
            if w.poll() is None:
                try:
                    w.send_signal(signum)
                except ProcessLookupError:
                    pass

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        for rank in range(nproc):
            workers.append(subprocess.Popen(cmd, env=worker_env(rank, nproc, port), preexec_fn=die_with_parent))
        return _wait(workers, poll_s)
    finally:
        for w in workers:  # never leave a worker behind, whatever happened here
            if w.poll() is None:
                w.kill()
                w.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _wait(workers: list[subprocess.Popen], poll_s: float) -> int:
    codes: dict[int, int] = {}
    while len(codes) < len(workers):
        for rank, w in enumerate(workers):
            if rank in codes or w.poll() is None:
                continue
            codes[rank] = _code(w.returncode)
            if codes[rank] not in OK_CODES:
                alive = [r for r, o in enumerate(workers) if o.poll() is None]
                if alive:
                    print(f"hncse-dist: rank {rank} (pid {w.pid}) exited with code {codes[rank]}: "
                          f"stopping ranks {', '.join(map(str, alive))}", file=sys.stderr, flush=True)
                for r in alive:
                    workers[r].kill()
                for r in alive:
                    workers[r].wait()
                return codes[rank]
        time.sleep(poll_s)
    distinct = sorted(set(codes.values()))
    return distinct[-1] if distinct else 0
