"""Multi-process (gloo) proof that the distributed loss has the single-process gradient."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launch import torchrun

SCRIPT = Path(__file__).parent / "scripts" / "grad_check.py"


@pytest.mark.dist
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("objective", ["simcse", "pm"])
def test_distributed_gradient_equals_single_process(tmp_path, world, objective):
    out = tmp_path / "report.json"
    torchrun(world, [str(SCRIPT), objective, str(out)], timeout=180)
    report = json.loads(out.read_text())
    assert report["world"] == world
    assert report["loss"] == pytest.approx(report["ref_loss"], rel=1e-5)
    assert report["z1_grad_close"] and report["z2_grad_close"]
    assert report["params_grad_close"], report["max_param_grad_rel_err"]


@pytest.mark.dist
@pytest.mark.parametrize("objective", ["simcse", "pm"])
def test_accumulation_micro_step_sees_its_global_micro_batch(tmp_path, objective):
    out = tmp_path / "report.json"
    torchrun(2, [str(SCRIPT.parent / "accum_check.py"), objective, str(out)], timeout=180)
    report = json.loads(out.read_text())
    assert report["matches_micro_batch_semantics"]
    assert report["differs_from_one_big_batch"]
