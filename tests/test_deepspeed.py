"""DeepSpeed ZeRO-1, ZeRO-2 and ZeRO-3 (CPU accelerator, gloo) through Accelerate: the loss curve of 2
processes equals the plain-DDP run from the same seed; ZeRO-3 consolidates to a plain export."""

import json

import pytest
import torch

from tests.test_train_e2e import common, run_cli


def curve(out):
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if "loss" in r]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, tiny_bert, corpus):
    out = tmp_path_factory.mktemp("ddp") / "run"
    run_cli(["train", "--nproc-per-node", "2", *common(tiny_bert, corpus, out, max_steps=5, objective="hncse")])
    return out


@pytest.mark.slow
@pytest.mark.deepspeed
@pytest.mark.dist
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_loss_curve_equals_ddp(tmp_path, tiny_bert, corpus, ddp_run, stage):
    out = tmp_path / f"zero{stage}"
    proc = run_cli(["train", "--nproc-per-node", "2",
                    *common(tiny_bert, corpus, out, max_steps=5, objective="hncse",
                            deepspeed=f"ds_configs/zero{stage}.json")], timeout=900)
    assert "world size 2" in proc.stdout + proc.stderr
    ref, got = curve(ddp_run), curve(out)
    assert len(got) == len(ref) == 5
    assert got == pytest.approx(ref, rel=1e-4, abs=1e-5)
    # the exported model (consolidated from shards under ZeRO-3) equals the DDP run's
    from safetensors.torch import load_file

    a = load_file(str(ddp_run / "final" / "model.safetensors"))
    b = load_file(str(out / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    # a sharded checkpoint consolidates through 'hncse-dist export' to the same weights
    run_cli(["export", str(out / "checkpoints" / "step-00000005"), str(tmp_path / "exported")])
    c = load_file(str(tmp_path / "exported" / "model.safetensors"))
    for k in b:
        torch.testing.assert_close(c[k], b[k], rtol=1e-6, atol=1e-7)
