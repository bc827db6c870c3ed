"""slurm/train.sbatch on a real 2-node Slurm (tests/slurm_cluster.py: two slurmds on 127.0.0.2
and 127.0.0.3 of this machine), with the real trainer on a tiny random BERT, 2 CPU processes
per node (world 4, gloo, fp32):

* a 2-node run (srun-native and torchrun launch) gives the loss curve of a 4-process
  single-node run of the same config and seed;
* USR1 reaches every rank on both nodes, one checkpoint is written, the job requeues itself
  and the requeued job finishes with the uninterrupted curve; under proctrack/pgid too;
* kill -9 of one rank on node 2 ends the job on every node in bounded time, naming the rank
  and the node, without a requeue;
* a node whose slurmd is down, or a rendezvous that cannot form, fails in bounded time;
* scaling.sh over 1 and 2 nodes, then the report: one point per node count.
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

from tests.launch import child_env, torchrun
from tests.slurm_cluster import SlurmCluster, slurm_cluster  # noqa: F401  (session fixture)
from tests.test_slurm import (SCALING_SH, TRAIN_SBATCH, diagnostics, job_env, job_log,
                              metric_rows, train_overrides, train_steps, wait_done)

MAX_STEPS = 40
LAUNCH_LINE = re.compile(r"\[launch\] rank (\d+)/(\d+) local_rank (\d+) node_rank (\d+) node (\S+) "
                         r"master (\S+):(\d+) launcher (\w+) pid (\d+)")
RANK_DEATH_BOUND_S = 60.0
pytestmark = [pytest.mark.slow, pytest.mark.slurm]


def two_nodes(cluster: SlurmCluster, name: str) -> tuple[str, ...]:
    return ("--nodes=2", "--gpus-per-node=0", f"--cpus-per-task={cluster.cpus}", "--time=00:15:00",
            f"--job-name={name}")


def overrides(tiny_bert: str, corpus: str, out: Path, **extra) -> list[str]:
    # num_workers=0: the data configuration tests/test_resume.py checks resume with.
    return train_overrides(tiny_bert, corpus, max_steps=MAX_STEPS, save_every=0, eval_file="null",
                           num_workers=0, output_dir=out, **extra)


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in metric_rows(out) if "loss" in r]


def launches(log: str) -> list[tuple]:
    """(rank, world, local_rank, node_rank, node, master_addr, master_port, launcher, pid)."""
    return sorted({(int(m[0]), int(m[1]), int(m[2]), int(m[3]), m[4], m[5], int(m[6]), m[7], int(m[8]))
                   for m in LAUNCH_LINE.findall(log)})


def wait_training(cluster: SlurmCluster, cwd: Path, job_id: int, out: Path, steps: int = 3,
                  timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not ((out / "metrics.jsonl").is_file() and len(train_steps(out)) >= steps):
        info = cluster.job(job_id)
        assert info.get("JobState") in ("PENDING", "RUNNING"), diagnostics(cluster, cwd, job_id)
        assert time.monotonic() < deadline, "training never started" + diagnostics(cluster, cwd, job_id)
        time.sleep(0.2)


def processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line contains ``text`` (the job's output_dir)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


_REFERENCE: dict[str, list[float]] = {}


def single_node_losses(tiny_bert: str, corpus: str, root: Path) -> list[float]:
    """The same config and seed on 4 processes of one node (torchrun), no Slurm; computed once."""
    if "curve" not in _REFERENCE:
        out = root / "single-node"
        torchrun(4, ["hncse_dist.cli", "train", *overrides(tiny_bert, corpus, out)], module=True,
                 env=child_env(GLOO_SOCKET_IFNAME="lo"), timeout=400)
        _REFERENCE["curve"] = losses(out)
        assert len(_REFERENCE["curve"]) == MAX_STEPS
    return _REFERENCE["curve"]


def check_two_node_run(cluster: SlurmCluster, cwd: Path, job_id: int, out: Path, launcher: str,
                       reference: list[float]) -> None:
    info = wait_done(cluster, cwd, job_id)
    log = job_log(cwd, job_id)
    why = diagnostics(cluster, cwd, job_id)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", why
    head = re.search(rf"nodes=2 \(n\[1-2\]\) procs/node=2 world_size=4 launcher={launcher} "
                     r"rendezvous=127\.0\.0\.2:(\d+) \(node n1\)", log)
    assert head, why  # the rendezvous is on the first node's address
    port = int(head.group(1))
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    assert 10000 <= port < low, port  # below the ephemeral range

    ranks = launches(log)
    assert [r[0] for r in ranks] == [0, 1, 2, 3] and {r[1] for r in ranks} == {4}, why
    assert {r[7] for r in ranks} == {launcher}, why
    for rank, _, local_rank, node_rank, node, _, _, _, _ in ranks:
        assert rank == 2 * node_rank + local_rank, ranks
    by_node: dict[str, set[int]] = {}
    for r in ranks:
        by_node.setdefault(r[4], set()).add(r[3])
    assert set(by_node) == {"n1", "n2"} and all(len(v) == 1 for v in by_node.values()), ranks
    if launcher == "srun":  # srun numbers the nodes of the step in order; torchrun's agents race
        assert [(r[4], r[3], r[5], r[6]) for r in ranks] == [
            ("n1", 0, "127.0.0.2", port), ("n1", 0, "127.0.0.2", port),
            ("n2", 1, "127.0.0.2", port), ("n2", 1, "127.0.0.2", port)], ranks

    assert train_steps(out) == list(range(1, MAX_STEPS + 1))
    assert losses(out) == pytest.approx(reference, abs=1e-6, rel=0)
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["world_size"], summary["nodes"], summary["procs_per_node"], summary["device"]) == (4, 2, 2, "cpu")


def test_two_nodes_give_the_single_node_loss_curve(slurm_cluster: SlurmCluster, tiny_bert, corpus,
                                                   tmp_path: Path) -> None:
    """Both launchers at once (one core per node each: the ranks share it, --overcommit),
    while the single-node reference runs beside them."""
    jobs = {}
    for launcher in ("srun", "torchrun"):
        out = tmp_path / launcher
        options = (*two_nodes(slurm_cluster, f"mn-{launcher}")[:2], "--cpus-per-task=1",
                   "--time=00:15:00", f"--job-name=mn-{launcher}")
        jobs[launcher] = (out, slurm_cluster.sbatch(TRAIN_SBATCH, *overrides(tiny_bert, corpus, out),
                                                    sbatch_options=options, env=dict(job_env(2), LAUNCHER=launcher),
                                                    cwd=tmp_path))
    reference = single_node_losses(tiny_bert, corpus, tmp_path)
    for launcher, (out, job_id) in jobs.items():
        check_two_node_run(slurm_cluster, tmp_path, job_id, out, launcher, reference)


def _status(states: list[str], info: dict[str, str]) -> None:
    state = f"{info.get('JobState')}/{info.get('Reason')}/restarts={info.get('Restarts')}"
    if not states or states[-1] != state:
        states.append(state)


def test_usr1_reaches_both_nodes_checkpoints_requeues_and_resumes(
        slurm_cluster: SlurmCluster, tiny_bert, corpus, tmp_path: Path) -> None:
    out = tmp_path / "run"
    job_id = slurm_cluster.sbatch(TRAIN_SBATCH, *overrides(tiny_bert, corpus, out),
                                  sbatch_options=two_nodes(slurm_cluster, "mn-usr1"), env=job_env(2), cwd=tmp_path)
    wait_training(slurm_cluster, tmp_path, job_id, out)
    slurm_cluster.command("scancel", "--signal=USR1", "--batch", str(job_id))
    states: list[str] = []
    info = wait_done(slurm_cluster, tmp_path, job_id, on_poll=lambda i: _status(states, i))
    log = job_log(tmp_path, job_id)
    why = f"\nstates seen: {states}" + diagnostics(slurm_cluster, tmp_path, job_id)

    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "1", why
    first_run = log[: log.index("restart=1")]
    # The first rank to finish exited with the requeue code (srun then ends the others, all
    # past the checkpoint's last barrier); the checkpoint holds every rank's part.
    reports = re.findall(r"srun: error: (n\d): tasks? ([\d,-]+): (.+)", first_run)
    assert reports and reports[0][2] == "Exited with exit code 75", why
    stopped = [int(s) for s in re.findall(r"checkpoint at step (\d+) written, exiting 75", first_run)]
    assert stopped and len(set(stopped)) == 1 and 3 <= stopped[0] < MAX_STEPS, why
    ckpt = out / "checkpoints" / f"step-{stopped[0]:08d}"
    assert sorted(p.name for p in ckpt.glob("hncse_rank*.pt")) == [f"hncse_rank{r}.pt" for r in range(4)], why
    assert json.loads((ckpt / "COMPLETE").read_text())["world_size"] == 4, why
    resumed = re.search(r"resumed from \S+step-(\d+) at step (\d+)", log)
    assert resumed and int(resumed.group(1)) == int(resumed.group(2)) == stopped[0], why
    assert f"requeueing job {job_id} (restart 1)" in log, why
    assert train_steps(out) == list(range(1, MAX_STEPS + 1)), why
    # The whole curve, the resumed part included, is the uninterrupted single-node one bit for
    # bit: DDP keeps one bucket layout (ddp_fixed_buckets), so after the resume the 4-rank
    # all-reduce sums every gradient element in the uninterrupted run's order.
    reference = single_node_losses(tiny_bert, corpus, tmp_path)
    got = losses(out)
    cut = stopped[0]
    differing = {s + 1: a - b for s, (a, b) in enumerate(zip(got, reference)) if a != b}
    assert got == reference, f"cut at step {cut}; steps whose loss differs: {differing}{why}"


# A trainer stand-in (no torch, starts in a blink) that records, per rank, every signal it
# gets and where; a step every 0.1 s; USR1/TERM -> exit 75 at the end of the step.
STANDIN = """
import json, os, signal, sys, time
kv = dict(a.split("=", 1) for a in sys.argv[2:] if "=" in a)
out = kv["output_dir"]
rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
stop = []
def handle(sig, frame):
    stop.append(sig)
    with open(os.path.join(out, f"rank-{rank}.signal"), "a") as f:
        f.write(f"{signal.Signals(sig).name} {os.environ.get('SLURMD_NODENAME')}\\n")
for sig in (signal.SIGUSR1, signal.SIGTERM):
    signal.signal(sig, handle)
os.makedirs(out, exist_ok=True)
for step in range(1, int(kv["max_steps"]) + 1):
    time.sleep(0.1)
    if rank == 0:
        with open(os.path.join(out, "metrics.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, "loss": 1.0}) + "\\n")
    if stop:
        sys.exit(75)
"""


def standin_env(tmp_path: Path, launcher: str) -> dict[str, str]:
    trainer = tmp_path / "standin.py"
    trainer.write_text(STANDIN)
    return dict(job_env(2), LAUNCHER=launcher, HNCSE_TRAIN_CMD=f"{sys.executable} {trainer}")


def signals_seen(out: Path) -> dict[int, str]:
    return {int(p.stem.split("-")[1]): p.read_text().strip() for p in out.glob("rank-*.signal")}


def test_usr1_under_proctrack_pgid_reaches_every_rank_with_srun_launch(slurm_cluster: SlurmCluster,
                                                                       tmp_path: Path) -> None:
    """With ProctrackType=proctrack/pgid Slurm signals the task's process group only. srun
    launch: the ranks are the tasks, all four get USR1 and the job requeues. torchrun
    launch: ranks run in sessions of their own and never see it."""
    slurm_cluster.reconfigure(proctrack="pgid")
    try:
        seen = {}
        for launcher in ("srun", "torchrun"):
            out = tmp_path / launcher
            job_id = slurm_cluster.sbatch(TRAIN_SBATCH, "max_steps=3000", f"output_dir={out}",
                                          sbatch_options=two_nodes(slurm_cluster, f"pgid-{launcher}"),
                                          env=standin_env(tmp_path, launcher), cwd=tmp_path)
            wait_training(slurm_cluster, tmp_path, job_id, out, timeout=90)
            slurm_cluster.command("scancel", "--signal=USR1", "--batch", str(job_id))
            if launcher == "srun":
                info = slurm_cluster.wait_job(job_id, until=lambda j: j.get("Restarts") == "1", timeout=60)
                assert info["Restarts"] == "1", diagnostics(slurm_cluster, tmp_path, job_id)
                assert f"requeueing job {job_id}" in job_log(tmp_path, job_id)
            else:
                time.sleep(8)  # 80 steps of the stand-in: plenty of time to react
            seen[launcher] = signals_seen(out)
            slurm_cluster.command("scancel", str(job_id))
            slurm_cluster.wait_job(job_id, timeout=60)
        assert seen["srun"] == {0: "SIGUSR1 n1", 1: "SIGUSR1 n1", 2: "SIGUSR1 n2", 3: "SIGUSR1 n2"}, seen
        assert seen["torchrun"] == {}, seen
    finally:
        slurm_cluster.reconfigure(proctrack="linuxproc")


def test_a_killed_rank_ends_the_job_on_every_node(slurm_cluster: SlurmCluster, tiny_bert, corpus,
                                                  tmp_path: Path) -> None:
    """kill -9 of rank 3 (node n2): srun ends the other ranks (--kill-on-bad-exit), the
    job fails naming rank and node, and is not requeued (a crash is not a preemption)."""
    out = tmp_path / "run"
    job_id = slurm_cluster.sbatch(TRAIN_SBATCH, *train_overrides(tiny_bert, corpus, max_steps=100000,
                                                                 eval_file="null", num_workers=0, output_dir=out),
                                  sbatch_options=two_nodes(slurm_cluster, "mn-kill"), env=job_env(2), cwd=tmp_path)
    wait_training(slurm_cluster, tmp_path, job_id, out)
    ranks = launches(job_log(tmp_path, job_id))
    victim = next(r for r in ranks if r[0] == 3)
    assert victim[4] == "n2", ranks
    started = time.monotonic()
    os.kill(victim[8], 9)
    deadline = started + 240
    while (slurm_cluster.job(job_id).get("JobState") == "RUNNING" or processes_mentioning(str(out))) \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    elapsed = time.monotonic() - started
    print(f"\nrank 3 killed -> job over on both nodes after {elapsed:.1f} s")
    info = slurm_cluster.wait_job(job_id, timeout=60)
    log = job_log(tmp_path, job_id)
    why = diagnostics(slurm_cluster, tmp_path, job_id)
    assert elapsed < RANK_DEATH_BOUND_S, f"{elapsed:.1f} s{why}"
    assert not processes_mentioning(str(out)), why
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", why
    assert "ERROR: rank 3 on node n2 failed first (Killed); the step was ended on every node; " \
           "not requeueing" in log, why
    assert "requeueing job" not in log, why


def test_a_node_that_never_starts_fails_the_job_quickly(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """n2's slurmd is stopped before the job (the controller still believes it is up)."""
    out = tmp_path / "run"
    slurm_cluster.stop_node("n2")
    try:
        started = time.monotonic()
        job_id = slurm_cluster.sbatch(TRAIN_SBATCH, "max_steps=3000", f"output_dir={out}",
                                      sbatch_options=two_nodes(slurm_cluster, "mn-deadnode"),
                                      env=standin_env(tmp_path, "srun"), cwd=tmp_path)
        while "training failed" not in job_log(tmp_path, job_id) and time.monotonic() - started < 120:
            time.sleep(0.2)
        elapsed = time.monotonic() - started
        print(f"\nnode n2 down -> job failed after {elapsed:.1f} s")
        log = job_log(tmp_path, job_id)
        assert elapsed < 60, log
        assert re.search(r"ERROR: node n2 could not start its ranks \(.+\); the step was ended on every "
                         r"node; not requeueing. Check the node: scontrol show node n2", log), log
    finally:
        slurm_cluster.start_node("n2", wait=False)
        slurm_cluster.wait_nodes_idle(90)


def test_a_rendezvous_that_cannot_form_times_out(slurm_cluster: SlurmCluster, tiny_bert, corpus,
                                                 tmp_path: Path) -> None:
    """Node 2's ranks never start the trainer: the ranks on node 1 wait for them at the
    rendezvous for dist_timeout_minutes (here 0.25), then the job fails."""
    out = tmp_path / "run"
    env = job_env(2)
    # A site wrapper that hangs on the second node before starting the trainer.
    wrapper = tmp_path / "hang_on_n2.sh"
    wrapper.write_text(f'if [ "$SLURM_NODEID" = 1 ]; then sleep 600; fi\nexec {sys.executable} -m hncse_dist.cli "$@"\n')
    env["HNCSE_TRAIN_CMD"] = f"bash {wrapper}"
    started = time.monotonic()
    job_id = slurm_cluster.sbatch(TRAIN_SBATCH, *overrides(tiny_bert, corpus, out, dist_timeout_minutes=0.25),
                                  sbatch_options=two_nodes(slurm_cluster, "mn-rdzv"), env=env, cwd=tmp_path)
    info = wait_done(slurm_cluster, tmp_path, job_id)
    elapsed = time.monotonic() - started
    print(f"\nrendezvous without node 2 -> job failed after {elapsed:.1f} s")
    log = job_log(tmp_path, job_id)
    why = diagnostics(slurm_cluster, tmp_path, job_id)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", why
    assert elapsed < 120, why
    assert re.search(r"[Tt]imed out after \d+ seconds waiting for clients\. 2/4 clients joined", log), why
    # Both ranks of n1 time out at the same moment; srun may report them as one line.
    assert re.search(r"ERROR: (rank [01]|ranks 0-1) on node n1 failed first", log), why


def test_scaling_over_one_and_two_nodes_and_report(slurm_cluster: SlurmCluster, tiny_bert, corpus,
                                                   tmp_path: Path) -> None:
    study = tmp_path / "study"
    env = slurm_cluster.env
    env.update(job_env(2))
    del env["HNCSE_PROCS_PER_NODE"]  # set per point by --procs-per-node
    proc = subprocess.run(
        [str(SCALING_SH), "--cpu", "--nodes", "1 2", "--procs-per-node", "2", "--out", str(study),
         "--sbatch", f"--cpus-per-task={slurm_cluster.cpus} --time=00:15:00",
         *train_overrides(tiny_bert, corpus, max_steps=6, eval_file="null")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    jobs = [int(j) for j in re.findall(r"submitted \S+: job (\d+)", proc.stdout)]
    report_job = int(re.search(r"report job (\d+)", proc.stdout).group(1))
    info = wait_done(slurm_cluster, tmp_path, report_job)
    for job_id in jobs:
        assert slurm_cluster.job(job_id)["JobState"] == "COMPLETED", diagnostics(slurm_cluster, tmp_path, job_id)
    assert info["JobState"] == "COMPLETED", info

    rows = [[c.strip() for c in line.split("|")[1:-1]]
            for line in (study / "report.md").read_text().splitlines() if line.startswith("| n")]
    assert [(r[0], r[1], r[8], r[9]) for r in rows] == [("n1-p2", "2", "1", "cpu"), ("n2-p2", "4", "2", "cpu")]
    header = (study / "report.md").read_text().splitlines()[0]
    assert header.endswith("| nodes | device |"), header
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    assert plt.imread(study / "report.png").shape[:2] == (450, 1200)
