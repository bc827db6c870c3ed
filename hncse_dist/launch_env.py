"""Where this process sits in the job: torch.distributed's environment from the launcher.

torchrun (and ``hncse-dist train --nproc-per-node``) set RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT themselves. Under Slurm the trainer can also be started with one
``srun`` task per rank and no launcher in between (``LAUNCHER=srun`` in slurm/train.sbatch):
then ``slurm_launch_env`` derives those variables from Slurm's own

    SLURM_PROCID -> RANK            SLURM_LOCALID -> LOCAL_RANK     SLURM_NODEID -> GROUP_RANK
    SLURM_STEP_NUM_TASKS -> WORLD_SIZE     SLURM_STEP_TASKS_PER_NODE -> LOCAL_WORLD_SIZE

and the rendezvous address MASTER_ADDR / MASTER_PORT, which the batch script exports (the
first node's address and a port it checked is free there). Nothing is changed when RANK or
WORLD_SIZE is already set, outside an srun step (the batch shell has SLURM_PROCID=0 too),
or when the step has a single task.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import MutableMapping


class LaunchEnvError(RuntimeError):
    """The srun step lacks what a multi-process run needs; the message names the fix."""


def _first_count(tasks_per_node: str) -> str:
    """'2(x3),1' -> '2' (Slurm's compressed tasks-per-node list; this node's is the first
    only on homogeneous steps, which is what train.sbatch starts)."""
    return tasks_per_node.split(",")[0].split("(")[0]


def slurm_launch_env(environ: MutableMapping[str, str] | None = None) -> str | None:
    """Fill RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK from an srun step
    when no launcher set them. Returns "srun" when it did, None otherwise."""
    env = os.environ if environ is None else environ
    if "RANK" in env or "WORLD_SIZE" in env:
        return None
    if "SLURM_STEP_ID" not in env or "SLURM_PROCID" not in env:
        return None  # not inside an srun step (e.g. the batch shell itself)
    world = int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1")))
    if world <= 1:
        return None
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
    if missing:
        raise LaunchEnvError(
            f"srun started {world} tasks but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
            "not set: export the first "
            "node's address and a free port before srun (slurm/train.sbatch does), or launch with torchrun"
        )
    env["RANK"] = env["SLURM_PROCID"]
    env["WORLD_SIZE"] = str(world)
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    env["GROUP_RANK"] = env.get("SLURM_NODEID", "0")
    if env.get("SLURM_STEP_TASKS_PER_NODE"):
        env["LOCAL_WORLD_SIZE"] = _first_count(env["SLURM_STEP_TASKS_PER_NODE"])
    return "srun"


def describe(environ: MutableMapping[str, str] | None = None, launcher: str | None = None) -> str:
    """One line naming this process's place: rank, local rank, node rank, node, rendezvous."""
    env = os.environ if environ is None else environ
    if launcher is None:
        launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in env else "env"
    node = env.get("SLURMD_NODENAME") or socket.gethostname()
    return (f"rank {env.get('RANK', '0')}/{env.get('WORLD_SIZE', '1')} "
            f"local_rank {env.get('LOCAL_RANK', '0')} node_rank {env.get('GROUP_RANK', '0')} "
            f"node {node} master {env.get('MASTER_ADDR', '-')}:{env.get('MASTER_PORT', '-')} "
            f"launcher {launcher} pid {os.getpid()}")


def setup_launch_env() -> None:
    """Called by the trainer before the process group forms: srun-native mapping, then
    one line per rank on stderr (every rank: a multi-node log shows who ran where)."""
    try:
        launcher = slurm_launch_env()
    except LaunchEnvError as err:
        from .config import ConfigError

        raise ConfigError(str(err)) from None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        print(f"[launch] {describe(launcher=launcher)}", file=sys.stderr, flush=True)


def run_topology(world_size: int) -> dict:
    """What ran: nodes, processes per node and the device type (for summary.json and the
    scaling report)."""
    import torch

    nodes = os.environ.get("SLURM_STEP_NUM_NODES") or os.environ.get("SLURM_NNODES")
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size) or world_size)
    nodes = int(nodes) if nodes else max(1, world_size // max(1, local))
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {"nodes": nodes, "procs_per_node": world_size // nodes if world_size % nodes == 0 else None,
            "device": device}
