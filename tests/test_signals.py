"""Signals, exit codes and orphaned workers through ``hncse-dist train``: the workers never
outlive the launcher, every signal reaches every rank, the exit code is the workers' own, and
a run whose loss stays non-finite stops instead of looping forever."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.launch import REPO, child_env
from tests.test_train_e2e import common


def start(args, nproc=2, new_session=True, env=None):
    cmd = [sys.executable, "-m", "hncse_dist.cli", "train", *args]
    if nproc > 1:
        cmd += ["--nproc-per-node", str(nproc)]
    return subprocess.Popen(cmd, cwd=REPO, env=env or child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=new_session)


def children(pid):
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purpose
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def descendants(pid):
    """Every live process below ``pid`` (children, their children, ...)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(") ", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError):
                pass
    found, frontier = [], [pid]
    while frontier:
        kids = [p for p, parent in parents.items() if parent in frontier]
        found += kids
        frontier = kids
    return found


def wait_gone(pids, timeout):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if not any(alive(p) for p in pids):
            return time.monotonic() - t0
        time.sleep(0.05)
    return None


def kill_and_wait_gone(proc, pids, timeout):
    """SIGKILL ``proc``; seconds until every one of ``pids`` is gone (None: some outlived
    ``timeout``, and are then killed so that the test leaves nothing behind)."""
    proc.kill()
    proc.wait(timeout=10)
    took = wait_gone(pids, timeout)
    for p in pids:
        if alive(p):
            os.kill(p, signal.SIGKILL)
    return took


def steps_logged(out):
    path = out / "metrics.jsonl"
    if not path.is_file():
        return 0
    return max((json.loads(l)["step"] for l in path.read_text().splitlines() if '"loss"' in l), default=0)


def wait_training(out, proc, step=2, timeout=240):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if steps_logged(out) >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"ended early ({proc.returncode}):\n{proc.stdout.read()[-4000:]}")
        time.sleep(0.05)
    raise AssertionError("training never started")


def long_run(tiny_bert, corpus, out, **kw):
    return common(tiny_bert, corpus, out, max_steps=100000, save_every=0, eval_file="null", **kw)


def workers_of(launcher_pid, nproc=2, timeout=60):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        kids = children(launcher_pid)
        if len(kids) == nproc:
            return kids
        time.sleep(0.05)
    raise AssertionError(f"expected {nproc} workers under {launcher_pid}, found {children(launcher_pid)}")


def training_launcher(tmp_path, tiny_bert, corpus):
    """A 2-rank `hncse-dist train --nproc-per-node 2` that has logged its first steps."""
    out = tmp_path / "run"
    proc = start(long_run(tiny_bert, corpus, out))
    workers = workers_of(proc.pid)
    wait_training(out, proc)
    return out, proc, workers


def complete_steps(out):
    return sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*") if (p / "COMPLETE").is_file())


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 75), (signal.SIGUSR1, 75), (signal.SIGINT, 130)])
def test_signal_to_launcher_reaches_every_worker(tmp_path, tiny_bert, corpus, sig, code):
    out, proc, workers = training_launcher(tmp_path, tiny_bert, corpus)
    proc.send_signal(sig)  # the launcher only: it must forward
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == code, log[-4000:]
    assert "Traceback" not in log, log[-4000:]
    assert f"exiting {code}" in log
    assert wait_gone(workers, 10) is not None, "a worker outlived the launcher"
    assert len(complete_steps(out)) == 1  # one joint checkpoint, not one per rank


@pytest.mark.dist
@pytest.mark.slow
def test_group_sigint_like_ctrl_c_checkpoints_and_exits_130(tmp_path, tiny_bert, corpus):
    """Ctrl-C in a terminal signals the whole foreground process group."""
    out, proc, workers = training_launcher(tmp_path, tiny_bert, corpus)
    os.killpg(proc.pid, signal.SIGINT)
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, log[-4000:]
    assert "Traceback" not in log and "KeyboardInterrupt" not in log, log[-4000:]
    assert wait_gone(workers, 10) is not None
    assert len(complete_steps(out)) == 1


@pytest.mark.dist
@pytest.mark.slow
def test_sigkill_of_the_launcher_takes_the_workers_down(tmp_path, tiny_bert, corpus):
    out, proc, workers = training_launcher(tmp_path, tiny_bert, corpus)
    took = kill_and_wait_gone(proc, workers, 60)
    assert took is not None, "workers kept training after the launcher was killed"
    # they got SIGTERM as the launcher died: the run is resumable, nothing lost
    assert len(complete_steps(out)) == 1


@pytest.mark.dist
@pytest.mark.slow
def test_a_dead_rank_ends_the_job_with_its_code(tmp_path, tiny_bert, corpus):
    out, proc, workers = training_launcher(tmp_path, tiny_bert, corpus)
    t0 = time.monotonic()
    os.kill(workers[1], signal.SIGKILL)
    log = proc.communicate(timeout=60)[0]
    took = time.monotonic() - t0
    assert proc.returncode == 128 + signal.SIGKILL, log[-4000:]
    assert "rank 1" in log and "exited with code 137" in log
    assert wait_gone(workers, 10) is not None
    print(f"job ended {took:.1f} s after rank 1 was killed")
    assert took < 30


@pytest.mark.slow
def test_dataloader_workers_die_with_their_rank(tmp_path, tiny_bert, corpus):
    """kill -9 of a rank takes its DataLoader workers down too. They are children of the fork
    server the rank started (not of the rank), and each holds the server's keep-alive pipe, so
    before, the server and its workers waited forever once the rank was gone."""
    out = tmp_path / "run"
    proc = start(long_run(tiny_bert, corpus, out, num_workers=2), nproc=1)
    wait_training(out, proc)
    family = descendants(proc.pid)
    assert len(family) >= 3, family  # the fork server and its 2 workers
    took = kill_and_wait_gone(proc, family, 20)
    assert took is not None, "the rank's DataLoader workers outlived it"
    print(f"workers gone {took:.2f} s after the rank was killed")


# cos / 1e-39 overflows float32: every loss is non-finite from the first step on (before, the
# loop skipped such steps forever and ignored SIGTERM).
NAN_EVERY_STEP = {"temperature": 1e-39}


@pytest.mark.slow
def test_nonfinite_loss_every_step_stops_with_one_line(tmp_path, tiny_bert, corpus):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "hncse_dist.cli", "train",
         *long_run(tiny_bert, corpus, out, max_nonfinite_skips=7, log_every=3, **NAN_EVERY_STEP)],
        cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [l for l in proc.stderr.splitlines() if l.startswith("hncse-dist train: error:")]
    assert len(errors) == 1 and "7 consecutive steps" in errors[0] and "learning_rate" in errors[0]
    assert "Traceback" not in proc.stderr
    skipped = [l for l in proc.stdout.splitlines() if "non-finite loss" in l]
    assert 1 <= len(skipped) <= 3, skipped  # once per window (3), not once per step


@pytest.mark.dist
@pytest.mark.slow
def test_preemption_is_honoured_while_steps_are_skipped(tmp_path, tiny_bert, corpus):
    out = tmp_path / "run"
    proc = start(long_run(tiny_bert, corpus, out, max_nonfinite_skips=0, **NAN_EVERY_STEP),
                 env=child_env(PYTHONUNBUFFERED="1"))
    workers = workers_of(proc.pid)
    seen = []
    for line in proc.stdout:  # wait until steps are being skipped
        seen.append(line)
        if "non-finite loss" in line:
            break
    proc.send_signal(signal.SIGTERM)
    log = "".join(seen) + proc.communicate(timeout=60)[0]
    assert proc.returncode == 75, log[-4000:]
    assert "exiting 75" in log
    assert wait_gone(workers, 10) is not None
    assert complete_steps(out) == [0]
