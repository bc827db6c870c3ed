"""Training metrics users read: tokens/s, MFU, memory, the plain progress line of batch logs,
and the steady-state throughput that summary.json and `hncse-dist report` share."""

import json
import subprocess
import sys

import pytest
import torch

from hncse_dist.metrics import WARMUP_STEPS, FlopsModel, progress_line, steady_rate
from tests.launch import REPO, child_env
from tests.test_train_e2e import common


def test_flops_model_counts_dense_parameters_and_attention(tiny_bert):
    from hncse_dist.encoder import Encoder

    enc = Encoder.from_pretrained(tiny_bert, "cls")
    embeddings = enc.backbone.embeddings
    emb = sum(m.weight.numel() for m in embeddings.modules() if isinstance(m, torch.nn.Embedding))
    dense = sum(p.numel() for p in enc.parameters()) - emb
    fm = FlopsModel(enc)
    assert fm.dense_params == dense and fm.layers == 2 and fm.hidden == 64
    # 6 FLOPs per dense parameter per real token, 12 * L * h * len^2 per sequence for attention
    assert fm.step(real_tokens=100, sequences=4, seq_len=32) == 6.0 * dense * 100 + 12.0 * 2 * 64 * 32**2 * 4


def test_steady_rate_leaves_out_the_warm_up_steps():
    recs = [{"step": s, "sentences_per_s": 1.0 if s <= WARMUP_STEPS else 10.0 + s} for s in range(1, 11)]
    later = [10.0 + s for s in range(WARMUP_STEPS + 1, 11)]
    assert steady_rate(recs) == pytest.approx(sum(later) / len(later))
    assert steady_rate(recs[:3]) == pytest.approx(1.0)  # a short run: all of it
    assert steady_rate([]) is None


def test_progress_line_names_every_figure():
    line = progress_line(120, 1000, {"loss": 0.12345, "lr": 3e-5, "sentences_per_s": 135.2, "tokens_per_s": 4100.0,
                                     "mfu": 0.541, "memory_gb": 1.8, "nonfinite_skips": 0}, eta_s=3725)
    assert line == "step 120/1000 | loss 0.1235 | lr 3.00e-05 | 135 sent/s | 4100 tok/s | MFU 54.1% | ETA 1h02m | mem 1.80 GB"


@pytest.mark.slow
def test_batch_log_has_a_line_per_window_and_metrics_have_mfu(tmp_path, tiny_bert, corpus):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "hncse_dist.cli", "train",
                           *common(tiny_bert, corpus, out, max_steps=6, log_every=2, save_every=0, eval_file="null")],
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [l for l in proc.stdout.splitlines() if l.startswith("step ") and " | loss " in l]
    assert [l.split(" | ")[0] for l in lines] == ["step 2/6", "step 4/6", "step 6/6"]
    assert "Setting accelerator to CPU" not in proc.stdout + proc.stderr
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "loss" in r]
    for r in recs:
        # tokens/s counts the real tokens of both views: 5..32 per sentence in this corpus
        assert 2 * 5 <= r["tokens_per_s"] / r["sentences_per_s"] <= 2 * 32
        assert 0 < r["mfu"] < 1 and r["memory_gb"] > 0.05
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tokens_per_s"] == pytest.approx(steady_rate(recs, "tokens_per_s"))
    assert 0 < summary["mfu"] < 1


@pytest.mark.slow
def test_hparams_tab_holds_the_config_and_final_metrics(tmp_path, tiny_bert, corpus):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "hncse_dist.cli", "train",
                           *common(tiny_bert, corpus, out, max_steps=3, save_every=0, eval_file="null",
                                   learning_rate=4e-5)],
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    acc = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hp = start.session_start_info.hparams
    assert hp["learning_rate"].number_value == pytest.approx(4e-5) and hp["objective"].string_value == "hncse"
    summary = json.loads((out / "summary.json").read_text())
    final = acc.Scalars("hparam/final_loss")
    assert final[-1].value == pytest.approx(summary["final_loss"], rel=1e-6)


@pytest.mark.parametrize("value,needle", [("wandb", "pip install wandb"), ("tensorbord", "unknown tracker")])
def test_report_to_a_tracker_that_is_missing_is_refused(tmp_path, tiny_bert, corpus, value, needle):
    import importlib.util

    if value == "wandb" and importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    proc = subprocess.run([sys.executable, "-m", "hncse_dist.cli", "train",
                           *common(tiny_bert, corpus, tmp_path / "run", report_to=value)],
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and needle in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
