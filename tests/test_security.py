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


@pytest.mark.slow
@pytest.mark.dist
def test_payload_in_any_file_of_a_ddp_checkpoint_never_runs(tmp_path, tiny_bert, corpus, ddp_run):
    ckpt_rel = "checkpoints/step-00000004"
    names = files_of(ddp_run / ckpt_rel)
    assert {"COMPLETE", "model.safetensors", "optimizer.bin", "random_states_0.pkl", "random_states_1.pkl",
            "hncse_rank0.pt", "hncse_rank1.pt"} <= {str(n) for n in names}
    ran, resumed, unclear = [], [], []
    for i, name in enumerate(names):
        out = run_copy(ddp_run, tmp_path / f"r{i}")
        marker = tmp_path / f"marker{i}"
        plant(out / ckpt_rel / name, marker)
        proc = resume(tmp_path, tiny_bert, corpus, out)
        ran += [str(name)] if marker.exists() else []
        resumed += [str(name)] if proc.returncode == 0 else []
        lines = error_lines(proc)
        if not (lines and lines[0].startswith(f"hncse-dist train: error: refusing checkpoint {out / ckpt_rel}: {name} ")):
            unclear.append((str(name), proc.stderr[-1500:]))
    assert ran == [], f"the payload ran when planted in {ran}"
    assert resumed == [] and unclear == []


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.deepspeed
def test_payload_in_every_file_of_a_zero2_checkpoint_never_runs(tmp_path, tiny_bert, corpus):
    out = tmp_path / "zero2"
    ds = {"deepspeed": "ds_configs/zero2.json"}
    run_cli(["train", "--nproc-per-node", "2", *common(tiny_bert, corpus, out, max_steps=4, save_every=2, **ds)],
            timeout=900)
    ckpt = out / "checkpoints" / "step-00000004"
    names = [str(n) for n in files_of(ckpt)]
    assert "pytorch_model/mp_rank_00_model_states.pt" in names
    assert "pytorch_model/zero_pp_rank_1_mp_rank_00_optim_states.pt" in names
    # one launch per planted file: every file DeepSpeed or Accelerate would unpickle is guarded
    ran, resumed, unclear = [], [], []
    for i, name in enumerate(names):
        run = run_copy(out, tmp_path / f"r{i}")
        marker = tmp_path / f"marker{i}"
        plant(run / "checkpoints" / "step-00000004" / name, marker)
        proc = resume(tmp_path, tiny_bert, corpus, run, timeout=600, **ds)
        ran += [name] if marker.exists() else []
        resumed += [name] if proc.returncode == 0 else []
        lines = error_lines(proc)
        if name.endswith(".py"):
            continue  # DeepSpeed's scripts are never run on resume: the run may go on
        if not (lines and lines[0].startswith(f"hncse-dist train: error: refusing checkpoint {run / 'checkpoints' / 'step-00000004'}: {name} ")):
            unclear.append((name, proc.stderr[-1500:]))
    assert ran == [], f"the payload ran when planted in {ran}"
    assert [n for n in resumed if not n.endswith(".py")] == [] and unclear == []
    # a clean ZeRO-2 checkpoint passes the check (DeepSpeed's own classes are allowed, nothing else)
    from hncse_dist.checkpoint import check_files

    check_files(ckpt)


@pytest.mark.slow
@pytest.mark.dist
def test_rank_file_from_another_run_is_refused(tmp_path, tiny_bert, corpus, ddp_run, other_ddp_run):
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
