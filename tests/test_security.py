"""A checkpoint is data, never code: an object whose unpickling runs a command, planted in any
file of a real checkpoint (DDP and DeepSpeed ZeRO-2), is refused before it is unpickled, and
a folder whose parts come from different runs, steps or world sizes is refused too."""

import os
import pickle
import shutil
import zipfile

import pytest
import torch

from tests.launch import free_port
from tests.test_train_e2e import common, run_cli


class Payload:
    """Unpickling this runs ``touch MARKER``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant(file, marker):
    """Put the payload into ``file``: inside the object of a torch file, as the whole content of
    any other file, and as code in DeepSpeed's scripts."""
    if file.suffix == ".py":
        file.write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    elif zipfile.is_zipfile(file) and not file.suffix == ".safetensors":
        obj = torch.load(file, map_location="cpu", weights_only=False)  # the test's own file: trusted
        torch.save({"original": obj, "payload": Payload(marker)} if not isinstance(obj, dict)
                   else {**obj, "payload": Payload(marker)}, file)
    else:
        file.write_bytes(pickle.dumps(Payload(marker)))


def files_of(ckpt):
    return sorted(p.relative_to(ckpt) for p in ckpt.rglob("*") if p.is_file())


def run_copy(src_run, dst_run):
    shutil.copytree(src_run, dst_run)
    return dst_run


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, tiny_bert, corpus):
    out = tmp_path_factory.mktemp("ddp") / "run"
    run_cli(["train", "--nproc-per-node", "2", *common(tiny_bert, corpus, out, max_steps=4, save_every=2)])
    return out


@pytest.fixture(scope="module")
def other_ddp_run(tmp_path_factory, tiny_bert, corpus):
    out = tmp_path_factory.mktemp("ddp2") / "run"
    run_cli(["train", "--nproc-per-node", "2", *common(tiny_bert, corpus, out, max_steps=4, save_every=2)])
    return out


def resume(tmp_path, tiny_bert, corpus, out, nproc=2, timeout=300, **kw):
    args = common(tiny_bert, corpus, out, max_steps=6, save_every=2, resume="latest", **kw)
    return run_cli(["train", "--nproc-per-node", str(nproc), *args], check=False, timeout=timeout)


def error_lines(proc):
    return [l for l in proc.stderr.splitlines() if "hncse-dist train: error:" in l]


class WorldOfTwo:
    """What ``Checkpointer.load`` asks of its Accelerator: a world of 2 (rank 0), and
    ``load_state``, which only records that the libraries' own loading was reached."""

    num_processes, process_index = 2, 0

    def __init__(self):
        self.loaded = []

    def load_state(self, path):
        self.loaded.append(path)


def refusal_per_planted_file(ckpt, names, tmp_path):
    """Plant the payload in each file of a copy of ``ckpt`` in turn and load the copy the way a
    resume does (``Checkpointer.load``, in this process). Returns, per file: whether the payload
    ran, whether loading went on to the libraries, and the refusal (None if none)."""
    from hncse_dist.checkpoint import Checkpointer, CheckpointRefused

    seen = {}
    for i, name in enumerate(names):
        copy = tmp_path / f"c{i}" / ckpt.name
        shutil.copytree(ckpt, copy)
        marker = tmp_path / f"marker{i}"
        plant(copy / name, marker)
        acc = WorldOfTwo()
        try:
            Checkpointer(copy.parent, acc).load(copy)
            refusal = None
        except CheckpointRefused as err:
            refusal = str(err)
        seen[str(name)] = (marker.exists(), bool(acc.loaded), refusal, copy)
    return seen


def assert_each_refused_by_name(seen):
    ran = [n for n, (r, _, _, _) in seen.items() if r]
    assert ran == [], f"the payload ran when planted in {ran}"
    went_on = [n for n, (_, loaded, _, _) in seen.items() if loaded]
    assert went_on == [], f"loading went on to the libraries with the payload in {went_on}"
    unclear = [(n, why) for n, (_, _, why, copy) in seen.items()
               if not (why and why.startswith(f"refusing checkpoint {copy}: {n} "))]
    assert unclear == []


def plant_all(ckpt, names, marker_dir):
    """The payload in every file of ``names`` at once, each with its own marker."""
    markers = [marker_dir / f"marker-{ckpt.parents[1].name}-{i}" for i in range(len(names))]
    for name, marker in zip(names, markers):
        plant(ckpt / name, marker)
    return markers


@pytest.mark.slow
@pytest.mark.dist
def test_payload_in_any_file_of_a_ddp_checkpoint_never_runs(tmp_path, tiny_bert, corpus, ddp_run):
    ckpt_rel = "checkpoints/step-00000004"
    names = files_of(ddp_run / ckpt_rel)
    assert {"COMPLETE", "model.safetensors", "optimizer.bin", "random_states_0.pkl", "random_states_1.pkl",
            "hncse_rank0.pt", "hncse_rank1.pt"} <= {str(n) for n in names}
    # every file in turn, through the resume's loading path: refused by name before anything unpickles it
    assert_each_refused_by_name(refusal_per_planted_file(ddp_run / ckpt_rel, names, tmp_path))
    # one real resume of 2 processes through the CLI, the payload in every file but COMPLETE (which
    # would be refused before any other file is read): none runs, the first file read is named
    out = run_copy(ddp_run, tmp_path / "real")
    planted = [n for n in names if str(n) != "COMPLETE"]
    markers = plant_all(out / ckpt_rel, planted, tmp_path)
    proc = resume(tmp_path, tiny_bert, corpus, out)
    assert [str(n) for n, m in zip(planted, markers) if m.exists()] == [], "the payload ran on resume"
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = error_lines(proc)
    assert lines and lines[0].startswith(
        f"hncse-dist train: error: refusing checkpoint {out / ckpt_rel}: {planted[0]} "), proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.deepspeed
def test_payload_in_every_file_of_a_zero2_checkpoint_never_runs(tmp_path, tiny_bert, corpus):
    out = tmp_path / "zero2"
    ds = {"deepspeed": "ds_configs/zero2.json"}
    run_cli(["train", "--nproc-per-node", "2", *common(tiny_bert, corpus, out, max_steps=4, save_every=2, **ds)],
            timeout=900)
    ckpt_rel = "checkpoints/step-00000004"
    ckpt = out / ckpt_rel
    names = files_of(ckpt)
    assert "pytorch_model/mp_rank_00_model_states.pt" in map(str, names)
    assert "pytorch_model/zero_pp_rank_1_mp_rank_00_optim_states.pt" in map(str, names)
    scripts = [n for n in names if n.suffix == ".py"]
    data = [n for n in names if n.suffix != ".py"]
    assert scripts and data
    # every file DeepSpeed or Accelerate would unpickle is guarded: each in turn, through the
    # resume's loading path, is refused by name before anything unpickles it
    assert_each_refused_by_name(refusal_per_planted_file(ckpt, data, tmp_path))
    # ... and on a real ZeRO-2 resume through the CLI, with the payload in every file but COMPLETE
    run = run_copy(out, tmp_path / "real")
    planted = [n for n in data if str(n) != "COMPLETE"]
    markers = plant_all(run / ckpt_rel, planted, tmp_path)
    proc = resume(tmp_path, tiny_bert, corpus, run, timeout=600, **ds)
    assert [str(n) for n, m in zip(planted, markers) if m.exists()] == [], "the payload ran on resume"
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = error_lines(proc)
    assert lines and lines[0].startswith(
        f"hncse-dist train: error: refusing checkpoint {run / ckpt_rel}: {planted[0]} "), proc.stderr[-3000:]
    # DeepSpeed's scripts are never run on a real ZeRO-2 resume: the run goes on to the end
    run = run_copy(out, tmp_path / "scripts")
    markers = plant_all(run / ckpt_rel, scripts, tmp_path)
    proc = resume(tmp_path, tiny_bert, corpus, run, timeout=600, **ds)
    assert [str(n) for n, m in zip(scripts, markers) if m.exists()] == [], "a planted script ran on resume"
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {run / ckpt_rel} at step 4" in proc.stdout + proc.stderr
    # a clean ZeRO-2 checkpoint passes the check (DeepSpeed's own classes are allowed, nothing else)
    from hncse_dist.checkpoint import check_files

    check_files(ckpt)


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("attempt", range(3))
def test_rank_file_from_another_run_is_refused(tmp_path, tiny_bert, corpus, ddp_run, other_ddp_run, attempt):
    """Each rank exits 2 with one line, every time: a rank that left with its gloo process group
    up aborted in the interpreter's teardown (SIGABRT, "terminate called without an active
    exception") in about 1 refusal in 4 under load, hence the repeats."""
    out = run_copy(ddp_run, tmp_path / "mixed")
    ckpt = out / "checkpoints" / "step-00000004"
    shutil.copy(other_ddp_run / "checkpoints" / "step-00000004" / "hncse_rank1.pt", ckpt / "hncse_rank1.pt")
    # the ranks started by hand, so that each one's exit status is seen
    from tests.test_checkpoint import _rank_env, _start

    port = free_port()
    args = common(tiny_bert, corpus, out, max_steps=6, save_every=2, resume="latest")
    ranks = [_start(args, env=_rank_env(r, 2, port)) for r in range(2)]
    for p in ranks:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 2, err[-3000:]
        assert "terminate called" not in err, err[-3000:]
        lines = [l for l in err.splitlines() if "error" in l.lower()]
        assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
        assert lines[0].startswith(f"hncse-dist train: error: refusing checkpoint {ckpt}: hncse_rank1.pt belongs to run ")
        assert lines[0].endswith("the folder mixes two runs; resume from another checkpoint")


@pytest.mark.slow
@pytest.mark.dist
def test_rank_file_from_another_step_is_refused(tmp_path, tiny_bert, corpus, ddp_run):
    from hncse_dist.checkpoint import CheckpointRefused, check_parts

    out = run_copy(ddp_run, tmp_path / "mixed")
    ckpt = out / "checkpoints" / "step-00000004"
    check_parts(ckpt, world_size=2)  # the clean folder passes
    shutil.copy(out / "checkpoints" / "step-00000002" / "hncse_rank0.pt", ckpt / "hncse_rank0.pt")
    with pytest.raises(CheckpointRefused, match=r"hncse_rank0.pt belongs to run \S+ step 2 .* COMPLETE to run \S+ step 4"):
        check_parts(ckpt, world_size=2)
    (ckpt / "hncse_rank0.pt").unlink()
    with pytest.raises(CheckpointRefused, match=r"holds the rank files \['hncse_rank1.pt'\], a world of 2 writes"):
        check_parts(ckpt, world_size=2)


@pytest.mark.slow
@pytest.mark.dist
def test_resume_with_another_world_size_is_one_line_exit_2(tmp_path, tiny_bert, corpus, ddp_run):
    out = run_copy(ddp_run, tmp_path / "ws")
    proc = resume(tmp_path, tiny_bert, corpus, out, nproc=1)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    err = [l for l in proc.stderr.splitlines() if "error" in l.lower()]
    assert len(err) == 1, proc.stderr
    assert err[0] == (f"hncse-dist train: error: {out / 'checkpoints' / 'step-00000004'} was written by 2 "
                      "processes, this run has 1: resume with --nproc-per-node 2 (the data position and the "
                      "bank are per world size)")


@pytest.mark.slow
@pytest.mark.dist
def test_export_refuses_a_planted_checkpoint(tmp_path, ddp_run):
    out = run_copy(ddp_run, tmp_path / "exp")
    ckpt = out / "checkpoints" / "step-00000004"
    marker = tmp_path / "marker"
    plant(ckpt / "optimizer.bin", marker)
    proc = run_cli(["export", str(ckpt), str(tmp_path / "exported")], check=False, timeout=300)
    assert proc.returncode == 2 and not marker.exists()
    assert f"hncse-dist export: error: refusing checkpoint {ckpt}: optimizer.bin is not plain checkpoint data" in proc.stderr
