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


def test_recipe_check_estimate_small(tmp_path: Path):
    """The recipe check's cadence and FLOPs arithmetic on a 2,000-line stand-in corpus."""
    require_data_dir()
    out = tmp_path / "recipe.json"
    run(["bench/recipe_check.py", "--stages", "estimate", "--lines", "2000", "--token-batches", "8",
         "--work", str(tmp_path / "work"), "--output", str(out)])
    est = json.loads(out.read_text())["estimate"]
    recipe = est["recipe"]
    assert est["samples"] == 2000 and est["steps_per_epoch"] == 2000 // recipe["batch_size"] == 31
    assert est["evaluations"] == 1 and est["checkpoints"] == 1  # 31 steps: only the final ones
    bert = est["bert_base"]
    assert (bert["layers"], bert["hidden"]) == (12, 768)
    # bert-base-uncased without its pooler (108,891,648) plus the cls MLP head (768 x 768 + 768);
    # FLOPs count all but the three embedding tables (30522, 512 and 2 rows of 768)
    assert bert["parameters"] == 108_891_648 + 768 * 768 + 768
    assert bert["dense_parameters"] == bert["parameters"] - (30522 + 512 + 2) * 768
    tokens = est["tokens"]
    per_view = tokens["real_tokens_per_view_mean"]
    assert 5 * recipe["batch_size"] < per_view <= recipe["max_seq_length"] * recipe["batch_size"]
    # FlopsModel.step is linear in the real tokens: the mean over batches is the step at the mean
    expected = (6.0 * bert["dense_parameters"] * 2 * per_view
                + 12.0 * bert["layers"] * bert["hidden"] * tokens["padded_length_mean"] ** 2 * 2 * recipe["batch_size"])
    assert math.isclose(est["flops_per_step"], expected, rel_tol=0.02)
    a100 = next(g for g in est["gpus"] if g["gpu"] == "A100")
    assert math.isclose(a100["train_min@30%"], est["flops_epoch"] / (312e12 * 0.3) / 60, rel_tol=1e-9)
    assert (tmp_path / "recipe.md").is_file()
