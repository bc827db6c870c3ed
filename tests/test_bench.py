"""The benchmark scripts run end to end (small settings) and write what BENCHMARKS.md reads."""

import json
import math
import subprocess
import sys
from pathlib import Path


from tests.datadir import REPO_ROOT, require_data_dir


def run(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_comm_model_bank_reuse_saves_bytes(tmp_path: Path):
    out = tmp_path / "comm.json"
    run(["bench/comm_model.py", "--output", str(out)])
    rows = json.loads(out.read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    for r in rows:
        assert r["separate_bank_push_bytes"] > 0
        ring = r["links"]["25GBps"]["ring"]
        assert ring["separate_bank_push_s"] > 0 and ring["contrastive_comm_s"] > 0
    assert (tmp_path / "comm.md").is_file()


def test_throughput_smoke_tiny(tmp_path: Path):
    corpus = require_data_dir() / "corpus" / "wiki_en_sentences.txt"
    out = tmp_path / "throughput.json"
    run(["bench/throughput.py", "--models", "tiny", "--precision", "fp32", "--steps", "1", "--warmup", "0",
         "--micro-reps", "2", "--threads", "1", "--corpus", str(corpus), "--output", str(out)])
    result = json.loads(out.read_text())
    variants = set(result["raw"])
    for key in ("hncse-simcse", "hncse-hncse", "st-mnrl", "hncse-simcse-padded", "hncse-simcse-2fwd",
                "hncse-simcse+loop-adamw"):
        assert f"tiny/fp32/{key}" in variants
    targets = {t["target"] for t in result["targets"]}
    assert any("st-mnrl" in t for t in targets) and any("MFU" in t for t in targets)
    losses = [loss for v in result["raw"].values() for loss in v["losses"]]
    assert losses and all(math.isfinite(loss) and loss > 0 for loss in losses)
    assert (tmp_path / "throughput.md").is_file()
