"""End to end: the CLI trains a tiny BERT in a real world of 2 gloo processes and exports a
model that SentenceTransformer loads with the trainer's own embeddings."""

import json
import subprocess
import sys

import pytest
import torch

from tests.launch import REPO, child_env


def run_cli(args, timeout=600, check=True):
    proc = subprocess.run([sys.executable, "-m", "hncse_dist.cli", *args], cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def common(tiny_bert, corpus, out, **kw):
    args = {"model_name_or_path": tiny_bert, "train_file": corpus, "output_dir": str(out), "batch_size": 8,
            "max_steps": 4, "log_every": 1, "eval_every": 0, "save_every": 2, "bank_size": 3, "num_workers": 0,
            "progress": "false", "hnm_k": 4, "hnm_m": 6, "param_digest": "true"}
    args.update(kw)
    return [f"{k}={v}" for k, v in args.items()]


@pytest.mark.dist
@pytest.mark.slow
def test_two_process_training_syncs_and_exports(tmp_path, tiny_bert, corpus):
    out = tmp_path / "run"
    proc = run_cli(["train", "--nproc-per-node", "2", *common(tiny_bert, corpus, out)])
    assert "world size 2 | global batch 16" in proc.stdout + proc.stderr
    ck = out / "checkpoints" / "step-00000002"
    r0 = torch.load(ck / "hncse_rank0.pt", weights_only=False)
    r1 = torch.load(ck / "hncse_rank1.pt", weights_only=False)
    # the ranks really synchronised: identical parameters after DDP steps
    assert r0["param_digest"] is not None and r0["param_digest"] == r1["param_digest"]
    # the bank is one all-gathered tensor, identical on both ranks: 2 steps x 16 global rows
    assert r0["negatives"]["bank"]["filled"] == 2 and r0["negatives"]["bank"]["rows"] == 16
    assert torch.equal(r0["negatives"]["bank"]["embeddings"], r1["negatives"]["bank"]["embeddings"])
    assert torch.equal(r0["negatives"]["bank"]["keys"], r1["negatives"]["bank"]["keys"])
    # both ranks consumed the same number of batches
    assert r0["data"]["batches_consumed"] == r1["data"]["batches_consumed"] == 2
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines if "loss" in l] == [1, 2, 3, 4]
    assert all(l["world_size"] == 2 for l in lines if "loss" in l)

    from sentence_transformers import SentenceTransformer

    from hncse_dist.encoder import Encoder

    sentences = ["a cat sleeps under the tree", "the city music is loud", "a bird sings"]
    ours = Encoder.from_pretrained(str(out / "final"), pooler=None).encode(sentences)
    st = SentenceTransformer(str(out / "final"), device="cpu").encode(sentences, convert_to_tensor=True)
    torch.testing.assert_close(st.cpu(), ours, rtol=1e-5, atol=1e-5)
    from transformers import AutoModel

    AutoModel.from_pretrained(str(out / "final"))
    # the last checkpoint exports to the same model as the run's final export
    run_cli(["export", str(out / "checkpoints" / "step-00000004"), str(tmp_path / "exported")])
    again = Encoder.from_pretrained(str(tmp_path / "exported"), pooler=None).encode(sentences)
    torch.testing.assert_close(again, ours)


@pytest.mark.parametrize(
    "override, message",
    [
        (["objective=moco"], "objective='moco' does not exist: use one of simcse, pm, hnm, hncse"),
        (["learning_rat=1e-5"], "unknown config key 'learning_rat': did you mean 'learning_rate'?"),
        (["train_file=/nonexistent/x.txt"], "train_file=/nonexistent/x.txt does not exist"),
    ],
)
def test_bad_input_gives_one_clear_error_line(tmp_path, tiny_bert, corpus, override, message):
    proc = run_cli(["train", *common(tiny_bert, corpus, tmp_path / "r"), *override], check=False, timeout=120)
    assert proc.returncode == 2
    err = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(err) == 1 and message in err[0], proc.stderr


def test_empty_training_file_is_refused(tmp_path, tiny_bert, corpus):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    proc = run_cli(["train", *common(tiny_bert, str(empty), tmp_path / "r")], check=False, timeout=120)
    assert proc.returncode == 2 and "is empty" in proc.stderr


def test_missing_config_file_is_refused(tmp_path):
    proc = run_cli(["train", "--config", str(tmp_path / "nope.yaml")], check=False, timeout=120)
    assert proc.returncode == 2 and "not found" in proc.stderr


@pytest.mark.dist
@pytest.mark.slow
def test_uneven_shards_over_two_ranks_finish_with_equal_steps(tmp_path, tiny_bert, corpus):
    """3 shards of 170/170/60 sentences over 2 ranks: a naive shard split gives the ranks 230
    and 170 samples and would hang a collective. Documented policy: every rank runs
    total // global_batch steps per epoch; the tail (400 - 25*16 = 0 here) is dropped."""
    from hncse_dist.data.shards import write_shards

    shards = tmp_path / "shards"
    write_shards([corpus], str(shards), samples_per_shard=170, progress=False)
    out = tmp_path / "run"
    args = common(tiny_bert, corpus, out, max_steps=0, num_epochs=1, save_every=0, log_every=5)
    args = [a for a in args if not a.startswith("train_file=")] + [f"train_shards={shards}"]
    run_cli(["train", "--nproc-per-node", "2", *args], timeout=300)
    ck = sorted((out / "checkpoints").glob("step-*"))[-1]
    assert ck.name == "step-00000025"
    r0 = torch.load(ck / "hncse_rank0.pt", weights_only=False)
    r1 = torch.load(ck / "hncse_rank1.pt", weights_only=False)
    assert r0["data"] == r1["data"] and r0["data"]["epoch"] == 1  # epoch fully consumed on both
