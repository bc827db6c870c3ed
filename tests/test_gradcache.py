"""GradCache (cache_chunk_size): the chunked step has the uncached step's gradients, loss,
statistics and bank push, on 1 and 2 gloo ranks, and trains the same loss curve end to end."""

import json
from pathlib import Path

import pytest

from tests.launch import torchrun
from tests.test_train_e2e import common, run_cli

SCRIPT = Path(__file__).parent / "scripts" / "gradcache_check.py"


@pytest.mark.dist
@pytest.mark.parametrize("world, modes", [(1, "packed,packed+ckpt,padded"), (2, "packed,packed+ckpt")])
def test_cached_step_has_the_uncached_gradients(tmp_path, tiny_bert, world, modes):
    out = tmp_path / "report.json"
    torchrun(world, [str(SCRIPT), tiny_bert, str(out), modes], timeout=240)
    report = json.loads(out.read_text())
    assert report["world"] == world
    cases = report["cases"]
    assert len(cases) == 4 * len(modes.split(",")) * 2  # objectives x forwards x dropout off/on
    buckets = {c["ref_allreduce_calls"] for name, c in cases.items() if name.endswith("no-dropout")}
    assert len(buckets) == 1 and buckets.pop() > 1
    n_buckets = cases["simcse/packed/no-dropout"]["ref_allreduce_calls"]
    for name, c in cases.items():
        # (i) dropout off: == the uncached full batch; (ii) dropout on: == the same chunks
        # encoded with gradient kept for the whole batch (the RNG replay is exact)
        assert c["grad_rel_err"] <= 1e-5 and c["grad_rel_err_no_keep"] <= 1e-5, (name, c)
        assert c.get("grad_rel_err_one_chunk", 0.0) <= 1e-5, (name, c)
        assert c["loss_abs_err"] <= 1e-6 and c["stats_abs_err"] <= 1e-6, (name, c)
        assert c["same_stat_keys"] == 1 and c["push_keys_equal"] == 1 and c["push_abs_err"] <= 1e-6, (name, c)
        # the replay leaves the RNG stream where the uncached step leaves it
        assert c["rng_after_equal"] == 1, (name, c)
        # 3 chunks, yet each gradient bucket is all-reduced once per step
        assert c["allreduce_calls"] == c["allreduce_calls_no_keep"] == n_buckets, (name, c)
        assert c.get("allreduce_calls_one_chunk", n_buckets) == n_buckets, (name, c)
        if name.endswith("/dropout"):
            # without the replay the masks differ and so do the gradients: the test can fail
            assert c["no_replay_grad_rel_err"] > 0.1, (name, c)


def test_cache_chunk_size_config_errors(tmp_path, corpus):
    from hncse_dist.config import ConfigError, TrainConfig

    with pytest.raises(ConfigError, match=r"cache_chunk_size=-1 is out of range: use an integer >= 0 \(0: off\)"):
        TrainConfig(train_file=corpus, cache_chunk_size=-1).validate()
    ds = tmp_path / "zero2.json"
    ds.write_text("{}")
    with pytest.raises(ConfigError, match="cache_chunk_size works with DDP only"):
        TrainConfig(train_file=corpus, cache_chunk_size=8, deepspeed=str(ds)).validate()
    assert TrainConfig(train_file=corpus, cache_chunk_size=8).validate().cache_chunk_size == 8


def test_cache_chunk_size_is_refused_with_exit_2(tmp_path, tiny_bert, corpus):
    proc = run_cli(["train", *common(tiny_bert, corpus, tmp_path / "r"), "cache_chunk_size=-3"], check=False,
                   timeout=120)
    assert proc.returncode == 2
    err = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(err) == 1 and "cache_chunk_size=-3 is out of range: use an integer >= 0 (0: off)" in err[0], proc.stderr


@pytest.mark.dist
@pytest.mark.slow
def test_two_process_cached_training_has_the_uncached_loss_curve(tmp_path, tiny_bert, corpus):
    """fp32, dropout off (the masks of one forward over 2N and of chunks differ by design):
    4 HNCSE steps of 2 accumulated micro-steps with a filling bank, 2 processes, chunks of 5 of
    the 16 sequences per rank.
    The avg pooler: a random-init BERT's [CLS] vectors are nearly parallel, so HNM's top-k
    would be decided by fp32 rounding of the encoder (which differs with the chunk shapes)."""
    curves = {}
    for name, extra in (("plain", []), ("cached", ["cache_chunk_size=5"])):
        out = tmp_path / name
        args = common(tiny_bert, corpus, out, save_every=0, eval_file="null", stats_every=1, pooler="avg",
                      gradient_accumulation_steps=2, dropout=0.0)
        proc = run_cli(["train", "--nproc-per-node", "2", *args, *extra], timeout=300)
        line = "GradCache: each rank's 16 sequences are encoded in chunks of 5"
        assert (line in proc.stdout + proc.stderr) == (name == "cached")
        lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
        curves[name] = [l for l in lines if "loss" in l]
    plain, cached = curves["plain"], curves["cached"]
    assert [l["step"] for l in cached] == [l["step"] for l in plain] == [1, 2, 3, 4]
    assert plain[-1]["bank/fill"] > 0  # the bank was read as HNM candidates
    skip = ("sentences_per_s", "tokens_per_s", "mfu", "memory_gb")  # timings and memory
    for p, c in zip(plain, cached):
        assert sorted(p) == sorted(c)
        for key in p:
            if key not in skip:
                assert c[key] == pytest.approx(p[key], rel=1e-5, abs=1e-6), (p["step"], key, c[key], p[key])
    # the curve moves, so equal curves mean equal updates
    assert plain[0]["loss"] != plain[-1]["loss"]
