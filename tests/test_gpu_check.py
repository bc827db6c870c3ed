"""bench/gpu_check.sh: valid bash, and on a machine without CUDA a clean refusal (exit 2, one
line naming the fix, no report) instead of a traceback or a half-run."""

import os
import subprocess
import sys

from tests.launch import REPO

SCRIPT = REPO / "bench" / "gpu_check.sh"


def test_gpu_check_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    subprocess.run([sys.executable, "-m", "py_compile", str(REPO / "bench" / "gpu_check.py")], check=True)


def test_gpu_check_refuses_without_cuda(tmp_path):
    report = tmp_path / "report.json"
    env = dict(os.environ, PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(["bash", str(SCRIPT), "--output", str(report)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"gpu_check: no CUDA GPU visible to {sys.executable} (torch.cuda.is_available() is False): "
        "run this on a GPU machine with the CUDA build of torch"]
    assert not report.exists()


def test_gpu_check_names_a_python_without_torch(tmp_path):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nexit 1\n")  # an interpreter where 'import torch' fails
    fake.chmod(0o755)
    env = dict(os.environ, PYTHON=str(fake))
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "cannot import torch: set PYTHON" in proc.stderr
