"""slurm/train.sbatch and slurm/scaling.sh on one node of a real Slurm (tests/slurm_cluster.py),
running the real trainer on a tiny random BERT with 2 CPU processes (gloo).

The cluster is configured with AuthInfo=cred_expire=5, so a requeued job is eligible again
6 s after `scontrol requeue` instead of Slurm's default 121 s.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.launch import REPO
from tests.slurm_cluster import SlurmCluster, slurm_cluster  # noqa: F401  (session fixture)

TRAIN_SBATCH = REPO / "slurm" / "train.sbatch"
SCALING_SH = REPO / "slurm" / "scaling.sh"
JOB_TIMEOUT_S = 240


def cpu_job(cluster: SlurmCluster) -> tuple[str, ...]:
    """One node with all its CPUs and no GPUs: overrides the GPU defaults of the header."""
    return ("--nodes=1", "--gpus-per-node=0", f"--cpus-per-task={cluster.cpus}", "--time=00:15:00")


def job_env(procs: int) -> dict[str, str]:
    """What the submitting shell of a user would have: the venv on PATH, CPU processes."""
    bin_dir = str(Path(sys.executable).parent)
    return {
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        "PYTHONPATH": str(REPO),
        "HNCSE_TRAIN_CMD": f"{sys.executable} -m hncse_dist.cli",
        "HNCSE_REPORT_CMD": f"{sys.executable} -m hncse_dist.cli report",
        "HNCSE_PROCS_PER_NODE": str(procs),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "GLOO_SOCKET_IFNAME": "lo",  # rank-to-rank traffic on loopback only
    }


def train_overrides(tiny_bert: str, corpus: str, **extra) -> list[str]:
    values = dict(model_name_or_path=tiny_bert, train_file=corpus, batch_size=8, max_seq_length=32,
                  log_every=1, progress="false", eval_every=0, objective="hncse")
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def job_log(cwd: Path, job_id: int) -> str:
    logs = list(cwd.glob(f"*-{job_id}.out"))
    return logs[0].read_text(errors="replace") if logs else f"(no log for job {job_id} in {cwd})"


def diagnostics(cluster: SlurmCluster, cwd: Path, job_id: int) -> str:
    return (f"\n--- scontrol show job {job_id}: {cluster.job(job_id)}\n--- job log:\n"
            f"{job_log(cwd, job_id)[-6000:]}\n{cluster.logs_tail(15)}")


def wait_done(cluster: SlurmCluster, cwd: Path, job_id: int, **kw) -> dict[str, str]:
    try:
        return cluster.wait_job(job_id, timeout=JOB_TIMEOUT_S, **kw)
    except TimeoutError as exc:
        subprocess.run(["scancel", str(job_id)], env=cluster.env, capture_output=True)
        raise AssertionError(f"{exc}{diagnostics(cluster, cwd, job_id)}") from None


def metric_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def train_steps(out: Path) -> list[int]:
    return [r["step"] for r in metric_rows(out) if "loss" in r]


@pytest.mark.slow
@pytest.mark.slurm
def test_train_sbatch_one_node_two_processes(slurm_cluster: SlurmCluster, tiny_bert, corpus,
                                             tmp_path: Path) -> None:
    out = tmp_path / "run"
    job_id = slurm_cluster.sbatch(
        TRAIN_SBATCH, *train_overrides(tiny_bert, corpus, max_steps=6, save_every=3,
                                       output_dir=out),
        sbatch_options=(*cpu_job(slurm_cluster), "--job-name=hncse-smoke"), env=job_env(2), cwd=tmp_path)
    info = wait_done(slurm_cluster, tmp_path, job_id)
    log = job_log(tmp_path, job_id)
    why = diagnostics(slurm_cluster, tmp_path, job_id)

    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", why
    assert (tmp_path / f"hncse-smoke-{job_id}.out").is_file()  # --output=%x-%j.out
    assert "procs/node=2 world_size=2" in log, why
    assert "world size 2 | global batch 16" in log, why  # the trainer's own start-up line
    assert {r["world_size"] for r in metric_rows(out) if "loss" in r} == {2}
    assert train_steps(out) == list(range(1, 7))
    complete = sorted(p.parent.name for p in (out / "checkpoints").glob("step-*/COMPLETE"))
    assert complete and complete[-1] == "step-00000006", complete
    assert list((out / "tb").glob("events.out.tfevents.*")), "no TensorBoard event file"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 6
    assert "launcher=srun" in log, why  # the default launch: one srun task per rank
    assert re.findall(r"\[launch\] rank (\d)/2 local_rank (\d) node_rank 0 node (n\d)", log) != [], why
    assert "training finished" in log, why


@pytest.mark.slow
@pytest.mark.slurm
def test_usr1_checkpoints_requeues_and_resumes(slurm_cluster: SlurmCluster, tiny_bert, corpus,
                                               tmp_path: Path) -> None:
    """USR1 to the batch shell (what --signal=B:USR1@T does before the time limit) ->
    trainer checkpoints and exits 75 -> the script requeues the job -> the same job id runs
    again with resume=latest and finishes; the logged steps have no gap and no repeat."""
    out = tmp_path / "run"
    max_steps = 40  # ~0.1 s a step here: the signal comes at step 3-5, long before the end
    job_id = slurm_cluster.sbatch(
        TRAIN_SBATCH, *train_overrides(tiny_bert, corpus, max_steps=max_steps, save_every=0,
                                       eval_file="null", output_dir=out),
        sbatch_options=(*cpu_job(slurm_cluster), "--job-name=hncse-requeue"), env=job_env(2), cwd=tmp_path)

    # Signal once training is under way (steps visible in metrics.jsonl).
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not ((out / "metrics.jsonl").is_file() and len(train_steps(out)) >= 3):
        info = slurm_cluster.job(job_id)
        assert info.get("JobState") in ("PENDING", "RUNNING"), diagnostics(slurm_cluster, tmp_path, job_id)
        assert time.monotonic() < deadline, "training never started" + diagnostics(slurm_cluster, tmp_path, job_id)
        time.sleep(0.2)
    slurm_cluster.command("scancel", "--signal=USR1", "--batch", str(job_id))

    states: list[str] = []

    def record(info: dict[str, str]) -> None:
        state = f"{info.get('JobState')}/{info.get('Reason')}/restarts={info.get('Restarts')}"
        if not states or states[-1] != state:
            states.append(state)

    info = wait_done(slurm_cluster, tmp_path, job_id, on_poll=record)
    log = job_log(tmp_path, job_id)
    why = f"\nstates seen: {states}" + diagnostics(slurm_cluster, tmp_path, job_id)

    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", why
    assert int(info["Restarts"]) >= 1, why
    assert "batch shell received SIGUSR1" in log and f"requeueing job {job_id}" in log, why
    stopped = re.search(r"checkpoint at step (\d+) written, exiting 75", log)
    resumed = re.search(r"resumed from \S+step-(\d+) at step (\d+)", log)
    assert stopped and resumed, why
    stop_step = int(stopped.group(1))
    assert int(resumed.group(1)) == int(resumed.group(2)) == stop_step, why
    assert 3 <= stop_step < max_steps, f"signal arrived too late (step {stop_step}){why}"
    # Continuous: every step exactly once, the second run starting right after the checkpoint.
    assert train_steps(out) == list(range(1, max_steps + 1)), why
    assert "restart=1" in log, why

    first_run = log[: log.index("restart=1")]
    # The first rank to finish exits 75 (srun then ends the other, past the checkpoint).
    reports = re.findall(r"srun: error: n\d: tasks? [\d,-]+: (.+)", first_run)
    assert reports and reports[0] == "Exited with exit code 75", why
    assert "scontrol requeue" not in log, why  # no failure message from the requeue itself
    assert json.loads((out / "summary.json").read_text())["steps"] == max_steps
    assert (out / "checkpoints" / f"step-{max_steps:08d}" / "COMPLETE").is_file()


# A trainer stand-in honouring the contract (no torch: starts in a blink): a step every
# 0.1 s, SIGUSR1/SIGTERM -> finish the step, checkpoint, exit 75.
STANDIN_TRAINER = """
import json, os, signal, sys, time
kv = dict(a.split("=", 1) for a in sys.argv[2:] if "=" in a)
out, rank = kv["output_dir"], int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
stop = []
def handle(sig, frame):
    stop.append(sig)
    open(os.path.join(out, f"rank-{rank}.signal"), "a").write(signal.Signals(sig).name + "\\n")
for sig in (signal.SIGUSR1, signal.SIGTERM):
    signal.signal(sig, handle)
os.makedirs(out, exist_ok=True)
for step in range(1, int(kv["max_steps"]) + 1):
    time.sleep(0.1)
    if rank == 0:
        with open(os.path.join(out, "metrics.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, "loss": 1.0}) + "\\n")
    if stop:
        ckpt = os.path.join(out, "checkpoints", f"step-{step:08d}")
        os.makedirs(ckpt, exist_ok=True)
        open(os.path.join(ckpt, "COMPLETE"), "w").close()
        print(f"rank {rank}: signal {stop[0]}, checkpoint at step {step}, exit 75", flush=True)
        sys.exit(75)
"""


@pytest.mark.slow
@pytest.mark.slurm
def test_scancel_checkpoints_but_is_not_requeued(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """SIGTERM (scancel, preemption, the limit itself) must not bring a job back."""
    trainer = tmp_path / "standin_trainer.py"
    trainer.write_text(STANDIN_TRAINER)
    env = job_env(2)
    env["HNCSE_TRAIN_CMD"] = f"{sys.executable} {trainer}"
    out = tmp_path / "run"
    job_id = slurm_cluster.sbatch(TRAIN_SBATCH, "max_steps=3000", f"output_dir={out}",
                                  sbatch_options=(*cpu_job(slurm_cluster), "--job-name=hncse-cancel"),
                                  env=env, cwd=tmp_path)
    deadline = time.monotonic() + 60
    while not ((out / "metrics.jsonl").is_file() and len(train_steps(out)) >= 3):
        assert time.monotonic() < deadline, diagnostics(slurm_cluster, tmp_path, job_id)
        time.sleep(0.2)
    slurm_cluster.command("scancel", str(job_id))
    deadline = time.monotonic() + 30
    while "not requeueing" not in job_log(tmp_path, job_id):
        assert time.monotonic() < deadline, diagnostics(slurm_cluster, tmp_path, job_id)
        time.sleep(0.2)
    time.sleep(1)
    info = slurm_cluster.job(job_id)
    why = diagnostics(slurm_cluster, tmp_path, job_id)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", why
    assert "requeueing job" not in job_log(tmp_path, job_id), why
    signals = [p.read_text().split()[0] for p in sorted(out.glob("rank-*.signal"))]
    assert signals == ["SIGTERM", "SIGTERM"], why  # both ranks got it ...
    assert list((out / "checkpoints").glob("step-*/COMPLETE")), why  # ... and checkpointed


@pytest.mark.slow
@pytest.mark.slurm
def test_scaling_study_and_report_job(slurm_cluster: SlurmCluster, tiny_bert, corpus,
                                      tmp_path: Path) -> None:
    """scaling.sh: 1 and 2 processes on the node, each its own run dir, then the
    dependent report job writes the table and the figure."""
    study = tmp_path / "study"
    env = slurm_cluster.env
    env.update(job_env(1))
    del env["HNCSE_PROCS_PER_NODE"]  # set per point by --procs-per-node
    proc = subprocess.run(
        [str(SCALING_SH), "--cpu", "--nodes", "1", "--procs-per-node", "1 2", "--out", str(study),
         # One core each, so both points run side by side (the test checks the plumbing,
         # not the numbers).
         "--sbatch", "--cpus-per-task=1 --time=00:15:00",
         *train_overrides(tiny_bert, corpus, max_steps=8, eval_every=4)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    train_jobs = [int(j) for j in re.findall(r"submitted \S+: job (\d+)", proc.stdout)]
    report_job = int(re.search(r"report job (\d+)", proc.stdout).group(1))
    assert len(train_jobs) == 2, proc.stdout

    info = wait_done(slurm_cluster, tmp_path, report_job)
    for job_id in train_jobs:
        job = slurm_cluster.job(job_id)
        assert job["JobState"] == "COMPLETED", diagnostics(slurm_cluster, tmp_path, job_id)
    assert info["JobState"] == "COMPLETED", (
        (study / f"report-{report_job}.out").read_text() if (study / f"report-{report_job}.out").exists() else info)

    for name, world in (("n1-p1", 1), ("n1-p2", 2)):
        summary = json.loads((study / name / "summary.json").read_text())
        assert summary["world_size"] == world and summary["global_batch"] == 8 * world
        assert summary["sentences_per_s"] > 0
    rows = [line for line in (study / "report.md").read_text().splitlines() if line.startswith("| n1")]
    assert [r.split("|")[1].strip() for r in rows] == ["n1-p1", "n1-p2"]
    assert rows[0].split("|")[6].strip() == "1.00"  # the baseline's scaling efficiency
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    assert plt.imread(study / "report.png").shape[:2] == (450, 1200)


def test_scaling_dry_run_builds_one_job_per_point(tmp_path: Path) -> None:
    """No Slurm needed: the sbatch command lines the driver would submit."""
    proc = subprocess.run(
        ["bash", str(SCALING_SH), "--dry-run", "--nodes", "1 2 4", "--global-batch", "512",
         "--out", str(tmp_path / "s"), "configs/quickstart.yaml", "max_steps=100"],
        capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "train.sbatch" in line]
    assert len(lines) == 3
    for n, line in zip((1, 2, 4), lines):
        assert f"HNCSE_OUTPUT_DIR={tmp_path / 's'}/n{n}" in line
        assert "HNCSE_GLOBAL_BATCH=512" in line and f"--nodes={n}" in line
        assert line.endswith("configs/quickstart.yaml max_steps=100")
    assert "--dependency=afterok" in proc.stderr and "report" in proc.stderr
    bad = subprocess.run(["bash", str(SCALING_SH), "--dry-run", "x.yaml", "output_dir=y"],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "use --out" in bad.stderr


@pytest.mark.parametrize("ci", ["", "true"])
def test_unavailable_slurm_skips_locally_and_fails_under_ci(monkeypatch, ci: str) -> None:
    """No Slurm needed: what the session fixture does when the cluster cannot start."""
    from tests import slurm_cluster as sc

    def cannot_start(self):
        raise sc.SlurmUnavailable("installing it needs root")

    monkeypatch.setattr(sc, "_SHARED", {"cluster": None, "users": 0})  # not the session's cluster
    monkeypatch.setattr(sc.SlurmCluster, "start", cannot_start)
    monkeypatch.setattr(sc.SlurmCluster, "stop", lambda self: None)
    monkeypatch.setenv("CI", ci)
    expected = pytest.fail.Exception if ci else pytest.skip.Exception
    with pytest.raises(expected, match="Slurm test cluster unavailable: installing it needs root"):
        next(sc.slurm_cluster_or_skip())
