"""The benchmark scripts run end to end (small settings), time the product's step and write what
BENCHMARKS.md reads; their shared round-robin timing drops the warm-up and rotates the order."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.datadir import REPO_ROOT, require_data_dir


def run(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_rounds_rotate_the_order_and_drop_the_warmup():
    from bench.common import rounds

    calls = []
    steps = {name: (lambda name=name: calls.append(name) or len(calls)) for name in "abc"}
    times, values = rounds(steps, warmup=1, timed=3, log=False)
    assert calls == list("abc" "bca" "cab" "abc")
    assert {n: len(t) for n, t in times.items()} == {"a": 3, "b": 3, "c": 3}
    assert all(t >= 0 for ts in times.values() for t in ts)
    # values of the timed rounds only: the positions of each step's calls after the first round
    assert values == {"a": [6, 8, 10], "b": [4, 9, 11], "c": [5, 7, 12]}


def test_timed_reads_marks_and_the_commands_own_peak_memory():
    """``timed`` sees a 200 MB allocation of the command itself (VmHWM, not the forking parent's
    pages), the time to a marked line, and raises with the output's tail when the command fails."""
    from bench.common import timed

    code = "import time; x = b'x' * 200_000_000; print('ready', flush=True); time.sleep(1.3)"
    res = timed("-c", code, marks={"ready": r"^ready"})
    assert 200 <= res["peak_rss_mb"] < 400 and res["peak_pss_tree_mb"] >= 200
    assert 0 < res["marks_s"]["ready"] < res["wall_s"] and res["cpu_s"] > 0
    with pytest.raises(RuntimeError, match="boom"):
        timed("-c", "import sys; print('boom'); sys.exit(3)")


def test_comm_model_bank_reuse_saves_bytes(tmp_path: Path):
    out = tmp_path / "comm.json"
    run(["bench/comm_model.py", "--output", str(out)])
    result = json.loads(out.read_text())
    for r in result["rows"]:
        assert r["separate_bank_push_bytes"] > 0
        ring = r["links"]["25GBps"]["ring"]
        assert ring["separate_bank_push_s"] > 0 and ring["contrastive_comm_s"] > 0
    # the product's FLOPs count of bert-base: 6 x dense parameters per token + attention
    base = next(r for r in result["rows"] if r["model"] == "bert-base" and r["world"] == 8)
    assert base["params"] == 109_482_240
    tokens, dense = 2 * 64 * 32, 85_056_000
    assert base["compute_s"] == pytest.approx((6 * dense * tokens + 12 * 12 * 768 * 32**2 * 128) / 100e12)
    assert (tmp_path / "comm.md").is_file()


@pytest.mark.slow
def test_throughput_smoke_tiny(tmp_path: Path):
    corpus = require_data_dir() / "corpus" / "wiki_en_sentences.txt"
    out = tmp_path / "throughput.json"
    run(["bench/throughput.py", "--models", "tiny", "--precision", "fp32", "--steps", "1", "--warmup", "0",
         "--micro-reps", "2", "--threads", "1", "--corpus", str(corpus), "--output", str(out)])
    result = json.loads(out.read_text())
    assert set(result["raw"]) == {f"tiny/fp32/{key}" for key in (
        "hncse-simcse", "hncse-pm", "hncse-hnm", "hncse-hncse", "st-mnrl", "hncse-simcse-padded")}
    targets = {t["target"] for t in result["targets"]}
    assert any("st-mnrl" in t for t in targets) and any("MFU" in t for t in targets)
    losses = [loss for v in result["raw"].values() for loss in v["losses"]]
    assert losses and all(math.isfinite(loss) and loss > 0 for loss in losses)
    # the product's FLOPs of the batch: FlopsModel over the real tokens of both views
    model = result["models"]["tiny"]
    assert model["padded_tokens"] == 2 * 64 * model["padded_len"] > model["real_tokens"] > 0
    assert (tmp_path / "throughput.md").is_file()


@pytest.mark.slow
def test_gradcache_bench_steps_equal_the_uncached_steps():
    """The bench's cached point runs the product's GradCache step: in a fresh process, the same
    losses step after step as the uncached one (same seeds, same batches)."""
    points = [json.loads(run(["bench/gradcache.py", "--worker", "memory", "--batch", "16", "--chunk", str(chunk),
                              "--hidden", "64", "--layers", "1"]).stdout.strip().splitlines()[-1])
              for chunk in (0, 8)]
    assert points[0]["losses"] == pytest.approx(points[1]["losses"], rel=1e-5, abs=1e-6)
    assert all(math.isfinite(x) for p in points for x in p["losses"])
    assert all(p["peak_mb"] > p["growth_mb"] > 0 for p in points)


@pytest.mark.slow
def test_data_throughput_smoke(tmp_path: Path):
    corpus = require_data_dir() / "corpus" / "wiki_en_sentences.txt"
    out = tmp_path / "data.json"
    run(["bench/data_throughput.py", "--lines", "2000", "--steps", "1", "--corpus", str(corpus), "--output", str(out)])
    result = json.loads(out.read_text())
    assert 0 < result["stream"]["samples"] <= 2000 and result["stream"]["samples"] % 64 == 0
    assert result["train"]["steps"] == 1 and math.isfinite(result["train"]["last_loss"])
    assert result["gzip_shards"]["tar_gz_bytes"] < result["gzip_shards"]["tar_bytes"]


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
