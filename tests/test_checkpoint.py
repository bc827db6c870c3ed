"""Checkpoint selection: only complete checkpoints count, newest first."""

from hncse_dist.checkpoint import MARKER, complete_checkpoints


def test_incomplete_checkpoint_is_never_picked(tmp_path):
    for step, complete in [(10, True), (20, True), (30, False)]:
        d = tmp_path / f"step-{step:08d}"
        d.mkdir()
        (d / "model.safetensors").write_text("x")
        if complete:
            (d / MARKER).write_text("{}")
    found = complete_checkpoints(tmp_path)
    assert [p.name for p in found] == ["step-00000010", "step-00000020"]


def test_numeric_not_lexical_order(tmp_path):
    for step in (9, 100, 20):
        d = tmp_path / f"step-{step}"
        d.mkdir()
        (d / MARKER).write_text("{}")
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-9", "step-20", "step-100"]


def test_missing_root_has_no_checkpoints(tmp_path):
    assert complete_checkpoints(tmp_path / "nope") == []


# --- one run per output folder, each step logged once, a full disk ----------------------------

import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402

from tests.launch import REPO, child_env, free_port  # noqa: E402
from tests.test_train_e2e import common, run_cli  # noqa: E402


def _records(out):
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


def _start(args, env=None):
    return subprocess.Popen([sys.executable, "-m", "hncse_dist.cli", "train", *args], cwd=REPO,
                            env=env or child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _wait(cond, proc, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if cond():
            return
        if proc.poll() is not None:
            raise AssertionError(f"trainer ended early (exit {proc.returncode}):\n{proc.stderr.read()[-4000:]}")
        time.sleep(0.05)
    raise AssertionError("no progress")


def _logged_steps(out):
    try:
        return [r["step"] for r in _records(out) if "loss" in r]
    except (FileNotFoundError, json.JSONDecodeError):
        return []


@pytest.mark.slow
def test_second_run_on_a_busy_output_dir_is_refused(tmp_path, tiny_bert, corpus):
    out = tmp_path / "run"
    first = _start(common(tiny_bert, corpus, out, max_steps=100000, save_every=0))
    try:
        _wait(lambda: len(_logged_steps(out)) >= 2, first)
        second = run_cli(["train", *common(tiny_bert, corpus, out, max_steps=3, save_every=0)], check=False,
                         timeout=300)
        assert first.poll() is None
        assert second.returncode == 2, second.stderr[-3000:]
        err = [l for l in second.stderr.splitlines() if "error" in l]
        assert err == [f"hncse-dist train: error: output_dir {out} is in use by another run (host "
                       f"{socket.gethostname()}, PID {first.pid}, run {json.loads((out / 'run.lock').read_text())['run_id']}): "
                       "wait for it to end, or choose another output_dir"], second.stderr
    finally:
        os.killpg(first.pid, signal.SIGTERM)
        first.communicate(timeout=300)
    assert first.returncode == 75
    # only the first run wrote: one record per step, one checkpoint
    steps = _logged_steps(out)
    assert steps == list(range(1, len(steps) + 1))
    assert [p.name for p in (out / "checkpoints").glob("step-*")] == [f"step-{steps[-1]:08d}"]
    # the lock went with the process: the folder is free again
    again = run_cli(["train", *common(tiny_bert, corpus, out, max_steps=steps[-1] + 2, save_every=0,
                                      resume="latest")], timeout=300)
    assert again.returncode == 0


@pytest.mark.slow
def test_resume_after_a_crash_logs_every_step_once(tmp_path, tiny_bert, corpus):
    """Killed (SIGKILL: no checkpoint of its own) after a periodic checkpoint: the records of the
    steps after that checkpoint are superseded by the resumed run's."""
    steps = 40
    kw = dict(max_steps=steps, save_every=5, keep_last=1)
    ref_out, out = tmp_path / "ref", tmp_path / "cut"
    run_cli(["train", *common(tiny_bert, corpus, ref_out, **kw)], timeout=600)
    run = _start(common(tiny_bert, corpus, out, **kw))
    _wait(lambda: (out / "checkpoints" / "step-00000005" / "COMPLETE").is_file() and max(_logged_steps(out)) >= 7, run)
    os.killpg(run.pid, signal.SIGKILL)
    run.communicate(timeout=60)
    killed_at = max(_logged_steps(out))
    cut = int(sorted((out / "checkpoints").glob("step-*"))[-1].name.split("-")[1])
    assert killed_at < steps
    again = run_cli(["train", *common(tiny_bert, corpus, out, resume="latest", **kw)], timeout=600)
    assert f"at step {cut}" in again.stdout + again.stderr
    got, want = _records(out), _records(ref_out)
    assert [r["step"] for r in got if "loss" in r] == list(range(1, steps + 1))
    assert [r["loss"] for r in got if "loss" in r] == [r["loss"] for r in want if "loss" in r]
    summary, ref_summary = (json.loads((d / "summary.json").read_text()) for d in (out, ref_out))
    assert summary["final_loss"] == ref_summary["final_loss"]
    # summary.json's throughput averages each step's record once (the warm-up steps left out)
    from hncse_dist.metrics import WARMUP_STEPS

    rates = [r["sentences_per_s"] for r in got if "sentences_per_s" in r]
    assert len(rates) == steps
    assert summary["sentences_per_s"] == pytest.approx(sum(rates[WARMUP_STEPS:]) / (steps - WARMUP_STEPS))


def _rank_env(rank, world, port, **extra):
    return child_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                     MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **extra)


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("size_mb, failing, kept", [
    (36, 4, ["step-00000002"]),  # the first checkpoint (~24 MB) fits, the second does not
    (12, 2, []),  # not even the first: the write itself fails (no earlier checkpoint to size it by)
])
def test_full_disk_while_checkpointing(tmp_path, tiny_bert, corpus, size_mb, failing, kept):
    """A tmpfs holds the checkpoints; every rank exits 1 with one line, nothing partial stays."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    out = tmp_path / "run"
    ckdir = out / "checkpoints"
    ckdir.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}M", "tmpfs", str(ckdir)], check=True)
    try:
        port = free_port()
        args = common(tiny_bert, corpus, out, max_steps=8, save_every=2, keep_last=1)
        ranks = [_start(args, env=_rank_env(r, 2, port)) for r in range(2)]
        results = [p.communicate(timeout=300) for p in ranks]
        message = f"no space left on device while writing checkpoint step-{failing:08d} in {ckdir}"
        for p, (so, se) in zip(ranks, results):
            assert p.returncode == 1, se[-3000:]
            assert f"hncse-dist train: error: {message}" in se.splitlines(), se[-3000:]
            assert "Traceback" not in se
        assert sorted(p.name for p in ckdir.iterdir()) == kept
        assert all((ckdir / k / MARKER).is_file() for k in kept)
        if not kept:
            return
        # the kept checkpoint resumes (into a copy on an ordinary disk)
        import shutil

        again_out = tmp_path / "again"
        shutil.copytree(out, again_out, ignore=shutil.ignore_patterns("run.lock"))
    finally:
        subprocess.run(["umount", str(ckdir)], check=True)
    again = run_cli(["train", "--nproc-per-node", "2",
                     *common(tiny_bert, corpus, again_out, max_steps=4, save_every=2, keep_last=1, resume="latest")],
                    timeout=300)
    assert "at step 2" in again.stdout + again.stderr
    assert (again_out / "checkpoints" / "step-00000004" / MARKER).is_file()


def test_run_lock_refuses_a_second_holder_and_frees_on_release(tmp_path):
    from hncse_dist.config import ConfigError
    from hncse_dist.runlock import RunLock

    first = RunLock(tmp_path, "run-a")
    with pytest.raises(ConfigError) as err:
        RunLock(tmp_path, "run-b")
    assert str(err.value) == (f"output_dir {tmp_path} is in use by another run (host {socket.gethostname()}, "
                              f"PID {os.getpid()}, run run-a): wait for it to end, or choose another output_dir")
    first.release()
    RunLock(tmp_path, "run-b").release()
    assert json.loads((tmp_path / "run.lock").read_text())["run_id"] == "run-b"


def test_superseded_records_are_dropped_atomically(tmp_path):
    from hncse_dist.runlock import drop_records_after

    path = tmp_path / "metrics.jsonl"
    recs = [{"step": s, "loss": float(s)} for s in (1, 2, 3, 4)] + [{"step": 4, "eval/x": 0.5}]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"step": 5, "lo')  # torn last line
    assert drop_records_after(path, 2) == 4
    assert [json.loads(l) for l in path.read_text().splitlines()] == recs[:2]
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # no temp file left
    assert drop_records_after(path, 2) == 0 and drop_records_after(tmp_path / "none.jsonl", 0) == 0
