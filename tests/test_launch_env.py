"""hncse_dist/launch_env.py: the srun-native launch maps Slurm's task variables (no Slurm needed)."""

from __future__ import annotations

import pytest

from hncse_dist.launch_env import LaunchEnvError, describe, slurm_launch_env

STEP = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
        "SLURM_STEP_NUM_TASKS": "4", "SLURM_NTASKS": "2", "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
        "SLURMD_NODENAME": "n2", "MASTER_ADDR": "127.0.0.2", "MASTER_PORT": "12345"}


def test_srun_task_becomes_a_torch_distributed_rank() -> None:
    env = dict(STEP)
    assert slurm_launch_env(env) == "srun"
    assert {k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE")} == {
        "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "GROUP_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    assert describe(env, "srun").startswith(
        "rank 3/4 local_rank 1 node_rank 1 node n2 master 127.0.0.2:12345 launcher srun pid ")


@pytest.mark.parametrize("change", [
    {"RANK": "0"},                 # a launcher (torchrun) already set it: left alone
    {"WORLD_SIZE": "2"},
    {"SLURM_STEP_ID": None},       # the batch shell itself (SLURM_PROCID=0 there too)
    {"SLURM_STEP_NUM_TASKS": "1"},  # one task: nothing to form
])
def test_left_alone(change: dict) -> None:
    env = dict(STEP)
    for k, v in change.items():
        if v is None:
            del env[k]
        else:
            env[k] = v
    before = dict(env)
    assert slurm_launch_env(env) is None
    assert env == before


def test_missing_rendezvous_address_names_the_fix() -> None:
    env = {k: v for k, v in STEP.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    with pytest.raises(LaunchEnvError, match="srun started 4 tasks but MASTER_ADDR and MASTER_PORT are not set: export the first node"):
        slurm_launch_env(env)
