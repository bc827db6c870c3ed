"""Start real multi-process runs from tests (torchrun on gloo)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hncse_dist.launcher import free_port  # noqa: F401  (tests import it from here)

REPO = Path(__file__).resolve().parents[1]




def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.update(extra)
    return env


def torchrun(nproc: int, args: list[str], timeout: float = 300, module: bool = False,
             env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    cmd += (["-m"] if module else []) + args
    proc = subprocess.run(cmd, cwd=REPO, env=env or child_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun exited {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-6000:]}")
    return proc
