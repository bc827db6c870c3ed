"""Shards from URLs (a loopback HTTP server), pipe: commands, patterns and lists; foreign
WebDataset shards; remote faults; weighted mixtures. No internet: 127.0.0.1 only."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from hncse_dist.config import ConfigError, load_config
from hncse_dist.data import ShardError, ShardStream, shards_main
from hncse_dist.data.plan import exact_rank_segments
from tests.fixtures import MINILM, write_corpus
from tests.launch import REPO, child_env

N_SHARDS, PER_SHARD = 8, 50  # 400 samples


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MINILM)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    """Shards written by `hncse-dist shards` (the CLI entry point)."""
    root = tmp_path_factory.mktemp("urls")
    text = write_corpus(root / "corpus.txt", N_SHARDS * PER_SHARD, seed=3)
    out = root / "shards"
    assert shards_main(["--input", text, "--output", str(out), "--samples-per-shard", str(PER_SHARD), "--quiet"]) == 0
    assert len(list(out.glob("shard-*.tar"))) == N_SHARDS
    return out


class _Handler(SimpleHTTPRequestHandler):
    missing: frozenset[str] = frozenset()  # file names answered with 404
    cut: frozenset[str] = frozenset()  # file names whose connection drops half-way

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        name = os.path.basename(self.path)
        if name in self.missing:
            self.send_error(404, "not here")
            return
        if name in self.cut:
            data = (Path(self.directory) / name).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        super().do_GET()


@contextlib.contextmanager
def serve(directory: Path, missing=(), cut=()):
    """An HTTP server on 127.0.0.1 in a thread, stopped (bounded) on exit; yields its base URL."""
    handler = type("H", (_Handler,), {"missing": frozenset(missing), "cut": frozenset(cut)})
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(directory)))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def pattern(prefix: str, n: int = N_SHARDS) -> str:
    return f"{prefix}/shard-{{000000..{n - 1:06d}}}.tar"


def batches(source, tokenizer, rank, world_size=2, num_workers=2, **kw):
    stream = ShardStream(source, tokenizer, 8, 32, seed=5, rank=rank, world_size=world_size,
                         num_workers=num_workers, shuffle_buffer=20, **kw)
    return [(b["keys"], b["input_ids"]) for b in stream]


def assert_same(a, b):
    assert len(a) == len(b) and len(a) > 0
    for (ka, ia), (kb, ib) in zip(a, b):
        assert ka == kb
        assert torch.equal(ia, ib)


# ----------------------------------------------------------------------------- URL forms


def test_url_pipe_list_and_pattern_sources_give_the_local_batches(shard_dir, tokenizer, tmp_path):
    listing = tmp_path / "shards.txt"
    listing.write_text("# one shard per line\n" + "".join(f"{p}\n" for p in sorted(shard_dir.glob("shard-*.tar"))))
    with serve(shard_dir) as base:
        sources = {
            "http": pattern(base),
            "pipe": "pipe:cat " + pattern(str(shard_dir)),
            "list": str(listing),
            "local-pattern": pattern(str(shard_dir)),
        }
        for rank in (0, 1):
            local = batches(str(shard_dir), tokenizer, rank)
            for kind, source in sources.items():
                assert_same(batches(source, tokenizer, rank), local), kind


@pytest.mark.parametrize("kind", ["http", "pipe"])
def test_resume_mid_epoch_from_url_equals_uninterrupted(shard_dir, tokenizer, kind):
    with serve(shard_dir) as base:
        source = pattern(base) if kind == "http" else "pipe:cat " + pattern(str(shard_dir))
        make = functools.partial(ShardStream, source, tokenizer, 8, 32, seed=5, rank=1, world_size=2,
                                 num_workers=2, shuffle_buffer=20)
        whole = [b["keys"] for b in make()]
        first = make()
        head = []
        for batch in first:
            head.append(batch["keys"])
            if len(head) == 7:
                break
        state = first.state_dict()
        rest = make()
        rest.load_state_dict(state)
        assert head + [b["keys"] for b in rest] == whole


def test_sizes_json_and_train_manifest_give_the_counts(shard_dir, tokenizer, tmp_path):
    """open_clip's sizes.json beside the shards, or a manifest given by path, instead of ours."""
    served = tmp_path / "served"
    served.mkdir()
    for p in shard_dir.glob("shard-*.tar"):
        shutil.copy(p, served / p.name)
    ours = json.loads((shard_dir / "manifest.json").read_text())
    (served / "sizes.json").write_text(json.dumps({e["name"]: e["count"] for e in ours["shards"]}))
    local = batches(str(shard_dir), tokenizer, 0)
    with serve(served) as base:
        assert_same(batches(pattern(base), tokenizer, 0), local)
        (served / "sizes.json").unlink()
        with pytest.raises(ShardError, match=r"no sample counts for http://127\.0\.0\.1:\d+/shard-000000\.tar.*"
                                             r"--manifest-out FILE.*train_manifest=FILE"):
            ShardStream(pattern(base), tokenizer, 8, 32)
        assert_same(batches(pattern(base), tokenizer, 0, manifest=str(shard_dir / "manifest.json")), local)


def test_config_accepts_url_forms_and_refuses_missing_paths(tmp_path):
    for spec in ("https://host/c4/shard-{0000..0999}.tar.gz", "s3://bucket/x/shard-{0..9}.tar",
                 "pipe:cat /data/shard-{000000..000009}.tar", "/nowhere/shard-{000000..000099}.tar"):
        assert load_config(None, [f"train_shards={spec}"]).validate().train_shards == spec
    with pytest.raises(ConfigError, match="train_shards=/nowhere/shards does not exist"):
        load_config(None, ["train_shards=/nowhere/shards"]).validate()
    yaml_file = tmp_path / "mix.yaml"
    (tmp_path / "wiki").mkdir()
    (tmp_path / "wiki" / "manifest.json").write_text('{"shards": []}')
    yaml_file.write_text('train_shards:\n  - {path: wiki, weight: 1.0}\n'
                         '  - {path: "https://h/cc-{000..099}.tar", weight: 0.5}\nresampled: true\n')
    cfg = load_config(yaml_file).validate()
    assert cfg.train_shards == [{"path": str(tmp_path / "wiki"), "weight": 1.0},
                                {"path": "https://h/cc-{000..099}.tar", "weight": 0.5}]
    assert cfg.resampled is True
    with pytest.raises(ConfigError, match="weight must be a number > 0"):
        load_config(None, ["train_shards=[{path: wiki, weight: -1}]"]).validate()


def test_s3_maps_to_the_aws_cli_like_webdataset():
    from hncse_dist.data.urls import map_url, shard_basename, sibling

    assert map_url("s3://b/k/shard-000001.tar") == "pipe:aws s3 cp s3://b/k/shard-000001.tar -"
    assert map_url("gs://b/shard-1.tar") == "gs://b/shard-1.tar"  # gopen: gsutil cat
    assert sibling("pipe:aws s3 cp s3://b/k/shard-000001.tar -", "sizes.json") == "pipe:aws s3 cp s3://b/k/sizes.json -"
    assert shard_basename("https://h/c4/shard-0001.tar.gz?x=1") == "shard-0001.tar.gz"


# ----------------------------------------------------------------------------- foreign shards


def write_foreign(root: Path, json_only: bool) -> dict[str, str]:
    """96 samples written by webdataset.ShardWriter; returns key -> text."""
    import webdataset as wds

    root.mkdir(parents=True)
    texts = {}
    with wds.ShardWriter(str(root / "part-%06d.tar"), maxcount=20) as sink:
        for i in range(96):
            key = f"docs.v{i % 3}/item.{i:04d}" if not json_only else f"j{i:04d}"
            key = key.replace("item.", "item_")  # dots in directories only: the base name ends the key
            text = f"foreign sentence {i} " + "tok " * (i % 9)
            texts[key] = text
            if json_only:
                sink.write({"__key__": key, "json": {"meta": {"sentence": text}, "id": i}})
            else:
                sink.write({"__key__": key, "txt": text, "json": {"id": i}, "cls": i % 4})
    return texts


@pytest.mark.parametrize("json_only", [True, False])
def test_foreign_webdataset_shards_are_indexed_and_read_exactly_once(tmp_path, tokenizer, capsys, json_only):
    root = tmp_path / "foreign"
    texts = write_foreign(root, json_only)
    args = ["--index", str(root)] + (["--text-key", "json:meta.sentence"] if json_only else [])
    assert shards_main(args) == 0
    assert "indexed 96 samples in 5 shards" in capsys.readouterr().out
    manifest = json.loads((root / "manifest.json").read_text())
    assert [e["count"] for e in manifest["shards"]] == [20, 20, 20, 20, 16]
    seen: dict[str, str] = {}
    for rank in (0, 1):
        stream = ShardStream(str(root), tokenizer, 8, 64, rank=rank, world_size=2, num_workers=2, shuffle_buffer=16)
        assert stream.batches_per_epoch == 96 // (2 * 8)
        for batch in stream:
            for key, ids in zip(batch["keys"], batch["input_ids"]):
                assert key not in seen
                seen[key] = tokenizer.decode(ids, skip_special_tokens=True)
    assert set(seen) == set(texts)  # every sample exactly once across ranks
    assert all(seen[k] == tokenizer.decode(tokenizer(texts[k])["input_ids"], skip_special_tokens=True) for k in texts)


def test_index_refuses_a_missing_text_key_and_urls_need_manifest_out(tmp_path, capsys, shard_dir):
    root = tmp_path / "foreign"
    write_foreign(root, json_only=True)
    assert shards_main(["--index", str(root)]) == 2
    assert "has no .txt member; set text_key (e.g. json:text or caption)" in capsys.readouterr().err
    assert shards_main(["--index", str(root), "--text-key", "json:meta.missing"]) == 2
    assert "has no field 'meta.missing' in its .json member" in capsys.readouterr().err
    with serve(shard_dir) as base:
        assert shards_main(["--index", pattern(base, 2)]) == 2
        assert "pass --manifest-out FILE" in capsys.readouterr().err
        out = tmp_path / "remote.json"
        assert shards_main(["--index", pattern(base, 2), "--manifest-out", str(out)]) == 0
    ours = json.loads((shard_dir / "manifest.json").read_text())["shards"][:2]
    indexed = json.loads(out.read_text())["shards"]
    assert [(e["name"], e["count"], e["sha256"], e["bytes"]) for e in indexed] == \
        [(e["name"], e["count"], e["sha256"], e["bytes"]) for e in ours]


# ----------------------------------------------------------------------------- remote faults


def first_shard_of(rank: int, seed: int, batch_size: int, world_size: int = 2) -> str:
    per_rank = (N_SHARDS * PER_SHARD) // (batch_size * world_size) * batch_size
    seg = exact_rank_segments([PER_SHARD] * N_SHARDS, seed, 0, rank, per_rank)[0]
    return f"shard-{seg.shard:06d}.tar"


@pytest.mark.parametrize("fault", ["404", "dropped"])
def test_http_fault_names_the_url_after_retries(shard_dir, tokenizer, fault):
    bad = first_shard_of(0, seed=5, batch_size=8)
    kw = {"missing": [bad]} if fault == "404" else {"cut": [bad]}
    detail = "curl exited 22: HTTP error status" if fault == "404" else "curl exited 18: transfer ended early"
    with serve(shard_dir, **kw) as base:
        t0 = time.monotonic()
        with pytest.raises(ShardError) as info:
            batches(pattern(base), tokenizer, 0, shard_retries=2, retry_delay=0.05)
        assert time.monotonic() - t0 < 60
    message = str(info.value)
    assert f"reading {base}/{bad} failed: {detail}" in message
    assert "(after 2 retries)" in message


def test_pipe_exit_status_and_short_shard_are_errors(shard_dir, tokenizer, tmp_path):
    bad = first_shard_of(0, seed=5, batch_size=8)
    with pytest.raises(ShardError, match=rf"reading pipe:cat {tmp_path}/{bad} failed: cat exited 1"):
        # every shard but the bad one exists in tmp_path: cat fails on that one
        for p in shard_dir.glob("shard-*"):
            if p.name != bad:
                shutil.copy(p, tmp_path / p.name)
        batches("pipe:cat " + pattern(str(tmp_path)), tokenizer, 0, shard_retries=0,
                manifest=str(shard_dir / "manifest.json"))
    # A command that succeeds but delivers a shorter shard: fewer samples than the manifest says.
    half = (shard_dir / bad).stat().st_size // 2
    short = f"pipe:head -c {half} {shard_dir}/{bad}"
    good = [f"pipe:cat {p}" for p in sorted(shard_dir.glob("shard-*.tar")) if p.name != bad]
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(sorted(good + [short], key=lambda u: u.rsplit("/", 1)[1])) + "\n")
    with pytest.raises(ShardError, match=rf"shard {short} ended after \d+ samples|corrupt or truncated shard {short}"):
        batches(str(listing), tokenizer, 0, shard_retries=0, manifest=str(shard_dir / "manifest.json"))
    # ... and a counted skip when asked: equal batch counts on both ranks, without that shard.
    streams = [ShardStream(str(listing), tokenizer, 8, 32, seed=5, rank=r, world_size=2, num_workers=0,
                           skip_corrupt=True, manifest=str(shard_dir / "manifest.json")) for r in (0, 1)]
    assert [len(s.skipped_shards) for s in streams] == [1, 1]
    assert streams[0].total_samples == (N_SHARDS - 1) * PER_SHARD
    assert [len(list(s)) for s in streams] == [(N_SHARDS - 1) * PER_SHARD // 16] * 2


# ----------------------------------------------------------------------------- mixtures


def test_mixture_is_exact_deterministic_and_resumable(shard_dir, tokenizer, tmp_path):
    other = tmp_path / "other"
    write_foreign(other, json_only=False)
    assert shards_main(["--index", str(other)]) == 0
    with serve(shard_dir) as base:
        mix = [{"path": str(other), "weight": 2.0}, {"path": pattern(base), "weight": 0.5}]
        make = functools.partial(ShardStream, mix, tokenizer, 8, 64, seed=1, world_size=2, num_workers=2,
                                 shuffle_buffer=16)
        ranks = [make(rank=r) for r in (0, 1)]
        assert ranks[0].total_samples == 2 * 96 + 200
        assert ranks[0].batches_per_epoch == ranks[1].batches_per_epoch == 392 // 16
        for epoch in (0, 1):
            keys = [k for s in ranks for b in s for k in b["keys"]]
            assert len(keys) == 24 * 16
            foreign = [k for k in keys if k.startswith("docs")]
            ours = [k for k in keys if not k.startswith("docs")]
            counts = {k: foreign.count(k) for k in set(foreign)}
            assert max(counts.values()) <= 2 and len(ours) == len(set(ours))  # w=2: twice; w=0.5: at most once
            assert len(foreign) + len(ours) == 384 and len(ours) >= 200 - 8 and len(foreign) >= 192 - 8
        whole = [b["keys"] for b in make(rank=1)]
        first = make(rank=1)
        head = [b["keys"] for _, b in zip(range(5), first)]
        again = make(rank=1)
        again.load_state_dict(first.state_dict())
        assert head + [b["keys"] for b in again] == whole


# ----------------------------------------------------------------------------- training


def train_cmd(tiny_bert, out, shards, **kw):
    args = {"model_name_or_path": tiny_bert, "train_file": "null", "train_shards": shards, "output_dir": str(out),
            "batch_size": 8, "max_steps": 6, "log_every": 1, "eval_every": 0, "save_every": 3, "bank_size": 3,
            "num_workers": 2, "shuffle_buffer": 20, "progress": "false", "hnm_k": 4, "hnm_m": 6, "seed": 5,
            "report_to": "none", "shard_retries": 1, "shard_retry_delay": 0.1}
    args.update(kw)
    return [sys.executable, "-m", "hncse_dist.cli", "train", "--nproc-per-node", "2",
            *[f"{k}={v}" for k, v in args.items()]]


def run(cmd, timeout=400):
    return subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=timeout)


def losses(out: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


@pytest.mark.slow
@pytest.mark.dist
def test_two_rank_training_from_http_equals_local_and_resumes(shard_dir, tiny_bert, tmp_path):
    local = run(train_cmd(tiny_bert, tmp_path / "local", str(shard_dir), max_steps=4, save_every=2))
    assert local.returncode == 0, local.stderr[-4000:]
    with serve(shard_dir) as base:
        remote = run(train_cmd(tiny_bert, tmp_path / "http", pattern(base), max_steps=4, save_every=2))
        assert remote.returncode == 0, remote.stderr[-4000:]
        # Resumed mid-epoch with 2 DataLoader workers: the loader starting later must not shift dropout.
        ckpt = tmp_path / "http" / "checkpoints" / "step-00000002"
        resumed = run(train_cmd(tiny_bert, tmp_path / "resumed", pattern(base), max_steps=4, save_every=2,
                                resume=str(ckpt)))
        assert resumed.returncode == 0, resumed.stderr[-4000:]
    ref = losses(tmp_path / "local")
    assert sorted(ref) == [1, 2, 3, 4]
    assert losses(tmp_path / "http") == ref  # bit for bit (fp32, CPU)
    assert losses(tmp_path / "resumed") == {s: ref[s] for s in (3, 4)}


@pytest.mark.slow
@pytest.mark.dist
def test_foreign_shards_train_one_epoch(tmp_path, tiny_bert):
    root = tmp_path / "foreign"
    write_foreign(root, json_only=True)
    assert shards_main(["--index", str(root), "--text-key", "json:meta.sentence"]) == 0
    proc = run(train_cmd(tiny_bert, tmp_path / "run", str(root), max_steps=0, num_epochs=1, save_every=0))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "6 steps" in proc.stdout + proc.stderr  # 96 // (2 ranks x 8)
    assert sorted(losses(tmp_path / "run")) == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
@pytest.mark.dist
def test_a_404_on_one_rank_ends_the_job_on_every_rank(shard_dir, tiny_bert, tmp_path):
    bad = first_shard_of(1, seed=5, batch_size=8)
    with serve(shard_dir, missing=[bad]) as base:
        t0 = time.monotonic()
        proc = subprocess.Popen(train_cmd(tiny_bert, tmp_path / "run", pattern(base), max_steps=20), cwd=REPO,
                                env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = proc.communicate(timeout=240)
        finally:
            if proc.poll() is None:
                proc.kill()
        elapsed = time.monotonic() - t0
    assert proc.returncode == 1, err[-4000:]
    assert f"hncse-dist train: error: reading {base}/{bad} failed: curl exited 22" in err
    assert "(after 1 retries)" in err
    assert "hncse-dist: rank 1" in err and "stopping ranks 0" in err
    assert elapsed < 200
    assert not (tmp_path / "run" / "checkpoints" / "step-00000020").exists()


def test_gzip_shards_through_a_pipe_whose_command_does_not_end_in_the_name(tmp_path, tokenizer):
    """Compression is recognised from the bytes, not the URL's ending (s3's `aws s3 cp URL -`)."""
    text = write_corpus(tmp_path / "c.txt", 120, seed=4)
    out = tmp_path / "gz"
    assert shards_main(["--input", text, "--output", str(out), "--samples-per-shard", "40", "--gzip", "--quiet"]) == 0
    source = f"pipe:cat {out}/shard-{{000000..000002}}.tar.gz | cat"
    assert_same(batches(source, tokenizer, 0, num_workers=0), batches(str(out), tokenizer, 0, num_workers=0))


def test_resampled_mixture_follows_the_weights_and_resumes_on_another_world_size(shard_dir, tokenizer, tmp_path):
    other = tmp_path / "other"
    write_foreign(other, json_only=False)
    assert shards_main(["--index", str(other)]) == 0
    mix = [{"path": str(shard_dir), "weight": 1.0}, {"path": str(other), "weight": 4.0}]
    make = functools.partial(ShardStream, mix, tokenizer, 8, 64, seed=2, num_workers=0, resampled=True)
    ranks = [make(rank=r, world_size=2) for r in (0, 1)]
    assert ranks[0].batches_per_epoch == ranks[1].batches_per_epoch == (400 + 4 * 96) // 16
    keys = [k for s in ranks for epoch in range(3) for b in s for k in b["keys"]]
    share = sum(k.startswith("docs") for k in keys) / len(keys)
    assert 0.3 < share < 0.7  # expected 4*96 / (400 + 4*96) = 0.49 (whole shards drawn: coarse)
    first = make(rank=0, world_size=2)
    for _ in zip(range(10), first):
        pass
    three = make(rank=0, world_size=3)
    three.load_state_dict(first.state_dict())  # resampled: another world size is accepted
    assert three.batches_consumed == 10 * 2 // 3
