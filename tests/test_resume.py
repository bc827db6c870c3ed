"""Preemption: SIGTERM / SIGUSR1 at an arbitrary step -> checkpoint -> exit 75 -> resume=latest, and the
loss curve equals an uninterrupted run's, bit for bit (fp32, CPU, same world size). World size 4
is the case where the all-reduce's summation order depends on DDP's bucket layout (ddp_fixed_buckets)."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.launch import REPO, child_env, free_port
from tests.test_train_e2e import common


def losses(out):
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def launch(args, nproc):
    if nproc == 1:
        cmd = [sys.executable, "-m", "hncse_dist.cli", "train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "hncse_dist.cli", "train", *args]
    return subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def trainer_pids(proc, nproc):
    if nproc == 1:
        return [proc.pid]
    out = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def wait_for_step(out, step, proc, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if (out / "metrics.jsonl").is_file() and max(losses(out), default=0) >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"trainer ended early:\n{proc.stdout.read()[-4000:]}")
        time.sleep(0.05)
    raise AssertionError("no progress")


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("nproc", [1, 2, 4])
def test_preempt_checkpoint_resume_reproduces_the_loss_curve(tmp_path, tiny_bert, corpus, nproc):
    steps = 30
    kw = dict(max_steps=steps, save_every=0, batch_size=8, keep_last=1)
    ref_out, out = tmp_path / "ref", tmp_path / "cut"
    ref = launch(common(tiny_bert, corpus, ref_out, **kw), nproc)
    ref_log = ref.communicate(timeout=600)[0]
    assert ref.returncode == 0, ref_log[-4000:]

    run = launch(common(tiny_bert, corpus, out, **kw), nproc)
    wait_for_step(out, 3, run)
    sig = "-TERM" if nproc == 1 else "-USR1"  # both are Slurm's warning signals
    for pid in trainer_pids(run, nproc):
        subprocess.run(["kill", sig, str(pid)])
    log = run.communicate(timeout=300)[0]
    assert "exiting 75" in log, log[-4000:]
    if nproc == 1:
        assert run.returncode == 75
    ckpts = sorted((out / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1 and (ckpts[0] / "COMPLETE").is_file()
    cut = int(ckpts[0].name.split("-")[1])
    assert 3 <= cut < steps

    again = launch(common(tiny_bert, corpus, out, resume="latest", **kw), nproc)
    log2 = again.communicate(timeout=600)[0]
    assert again.returncode == 0, log2[-4000:]
    assert f"at step {cut}" in log2
    got, want = losses(out), losses(ref_out)
    assert sorted(got) == list(range(1, steps + 1))  # continuous: nothing repeated or skipped
    differing = {s: got[s] - want[s] for s in range(1, steps + 1) if got[s] != want[s]}
    assert not differing, f"cut at step {cut}; steps whose loss differs (resumed - uninterrupted): {differing}"
    # the bank came back bit-exactly and kept evolving identically
    a = torch.load(ref_out / "checkpoints" / f"step-{steps:08d}" / "hncse_rank0.pt", weights_only=False)
    b = torch.load(out / "checkpoints" / f"step-{steps:08d}" / "hncse_rank0.pt", weights_only=False)
    assert torch.equal(a["negatives"]["bank"]["embeddings"], b["negatives"]["bank"]["embeddings"])
    assert torch.equal(a["negatives"]["generator"], b["negatives"]["generator"])
    assert a["param_digest"] == b["param_digest"]
