"""Data pipeline throughput (ShardStream, plain and gzip shards, sha256 verification, memory of a
large shard; ``--sources``: local, gzip, HTTP, pipe) against what the product's training step
consumes. Commands, method and results: BENCHMARKS.md."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import tracemalloc
from pathlib import Path

import torch
import transformers

from common import (MINILM, RESULTS, MemorySampler, bench_trainer, corpus, cpu_only, free_port, machine, need_file,
                    parser, train_step, write)

from hncse_dist.data import ShardStream, load_manifest, write_shards
from hncse_dist.data.tario import ShardReader

BATCH, MAX_LENGTH = 64, 32


def build_shards(corpus: Path, lines: int, work: Path, gzip: bool = False, per_shard: int = 10_000) -> str:
    head = work / f"head{lines}.txt"
    if not head.is_file():
        with open(corpus, encoding="utf-8") as src, open(head, "w", encoding="utf-8") as dst:
            dst.writelines(line for _, line in zip(range(lines), src))
    out = work / (("shards_gz" if gzip else "shards") + ("" if per_shard == 10_000 else f"_{per_shard}"))
    write_shards([str(head)], str(out), per_shard, progress=False, gzip=gzip)
    return str(out)


def entries(shard_dir: str) -> list[dict]:
    return load_manifest(shard_dir)["shards"]


def best_rate(fn, repeats: int = 3) -> float:
    """The highest of a few rates: the timing least disturbed by other work on the machine."""
    return max(fn() for _ in range(repeats))


def tar_read_rate(shard_dir: str, verify: bool = False) -> float:
    """Samples/s of reading the shards in one process (``verify``: against the manifest's sha256)."""
    start, count = time.perf_counter(), 0
    for e in entries(shard_dir):
        with ShardReader(os.path.join(shard_dir, e["name"]), count=e["count"],
                         sha256=e["sha256"] if verify else None) as reader:
            count += len(reader.read(e["count"]))
    return count / (time.perf_counter() - start)


def sha256_mb_per_s(shard_dir: str) -> float:
    blobs = [Path(shard_dir, e["name"]).read_bytes() for e in entries(shard_dir)]
    start = time.perf_counter()
    for blob in blobs:
        hashlib.sha256(blob).hexdigest()
    return sum(map(len, blobs)) / 2**20 / (time.perf_counter() - start)


def time_stream(stream: ShardStream, epochs: int = 1) -> dict:
    start, first, samples = time.perf_counter(), None, 0
    for _ in range(epochs):
        for batch in stream:
            first = first if first is not None else time.perf_counter() - start
            samples += batch["input_ids"].shape[0]
    seconds = time.perf_counter() - start
    return {"samples": samples, "seconds": seconds, "first_batch_s": first or 0.0, "samples_per_s": samples / seconds}


def worker_rss(stream: ShardStream) -> dict:
    """RSS (MB) of the stream's worker processes every 50 ms while it yields one epoch: the
    first sample of each, its peak and the growth between them."""
    with MemorySampler(os.getpid(), interval=0.05) as memory:
        samples = sum(b["input_ids"].shape[0] for b in stream)
    w = [v for pid, v in memory.rss.items() if pid != os.getpid() and len(v) > 2]
    return {"samples": samples, "workers": len(w), "first_rss_mb": max(v[0] for v in w) if w else None,
            "peak_rss_mb": max(max(v) for v in w) if w else None,
            "max_growth_mb": max(max(v) - v[0] for v in w) if w else None}


def large_shard_memory(shard_dir: str, tokenizer) -> dict:
    """All lines in one shard: Python heap peak of ShardReader against tarfile's own iteration
    (one TarInfo kept per member), and the workers' RSS while a 2-worker stream reads it."""
    (e,) = entries(shard_dir)
    path = os.path.join(shard_dir, e["name"])

    def heap_peak_mb(read) -> float:
        tracemalloc.start()
        try:
            read()
            return round(tracemalloc.get_traced_memory()[1] / 2**20, 2)
        finally:
            tracemalloc.stop()

    def with_reader() -> None:
        with ShardReader(path, count=e["count"], sha256=e["sha256"]) as reader:
            for _ in reader:
                pass

    def with_tarfile() -> None:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                tar.extractfile(member).read()

    return {"samples_in_shard": e["count"], "shard_bytes": e["bytes"], "reader_heap_peak_mb": heap_peak_mb(with_reader),
            "tarfile_members_heap_peak_mb": heap_peak_mb(with_tarfile),
            "stream_workers": worker_rss(ShardStream(shard_dir, tokenizer, BATCH, MAX_LENGTH))}


def time_training(shard_dir: str, work: Path, steps: int) -> dict:
    """``Trainer.train_step`` of SimCSE, bf16, on the stream's batches (fetched beforehand)."""
    trainer = bench_trainer(work / "train", model_name_or_path=MINILM, train_shards=shard_dir, objective="simcse",
                            mixed_precision="bf16", batch_size=BATCH, max_seq_length=MAX_LENGTH)
    groups = list(itertools.islice(trainer._micro_batches(), steps + 1))
    train_step(trainer, groups[0])  # warm-up: allocator, kernels
    start = time.perf_counter()
    losses = [train_step(trainer, g) for g in groups[1:]]
    seconds = time.perf_counter() - start
    return {"steps": steps, "seconds": seconds, "sentences_per_s": steps * BATCH / seconds,
            "seconds_per_step": seconds / steps, "last_loss": losses[-1], "model": "all-MiniLM-L6-v2 (packaged)",
            "precision": "bf16", "torch_threads": torch.get_num_threads()}


@contextlib.contextmanager
def http_server(directory: str):
    """``python -m http.server --bind 127.0.0.1`` on a free port, stopped by PID on exit."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port), "--directory",
                             directory], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait()


def sources(args, tokenizer, work: Path, shard_dir: str, gz_dir: str) -> dict:
    brace = f"shard-{{000000..{len(entries(shard_dir)) - 1:06d}}}.tar"
    with http_server(shard_dir) as base:
        kinds = {"local_tar": shard_dir, "local_tar_gz": gz_dir, "http_loopback": f"{base}/{brace}",
                 "pipe_cat": f"pipe:cat {shard_dir}/{brace}"}
        rates = {}
        for kind, source in kinds.items():
            s = time_stream(ShardStream(source, tokenizer, BATCH, MAX_LENGTH), args.epochs)
            rates[kind] = {"source": source.replace(str(work), "WORK"), "first_batch_s": round(s["first_batch_s"], 2),
                           "stream_samples_per_s": round(s["samples_per_s"], 1)}
    train = time_training(shard_dir, work, args.steps)
    for r in rates.values():
        r["ratio_over_train"] = round(r["stream_samples_per_s"] / train["sentences_per_s"], 1)
        r["meets_10x_target"] = r["ratio_over_train"] >= 10
    return {"sources": rates, "train_sentences_per_s": round(train["sentences_per_s"], 2), "train": train,
            "corpus_lines": args.lines, "shards": len(entries(shard_dir)), "num_workers": 2, "batch_size": BATCH,
            "max_length": MAX_LENGTH, "machine": machine()}


def pipeline(args, tokenizer, work: Path, shard_dir: str, gz_dir: str) -> dict:
    stream = ShardStream(shard_dir, tokenizer, BATCH, MAX_LENGTH)  # defaults: 2 workers
    plain = time_stream(stream, args.epochs)
    gz = time_stream(ShardStream(gz_dir, tokenizer, BATCH, MAX_LENGTH), args.epochs)
    read, verified = best_rate(lambda: tar_read_rate(shard_dir)), best_rate(lambda: tar_read_rate(shard_dir, True))
    sha = best_rate(lambda: sha256_mb_per_s(shard_dir))
    sizes = {"corpus_head_bytes": os.path.getsize(work / f"head{args.lines}.txt"),
             "tar_bytes": sum(e["bytes"] for e in entries(shard_dir)),
             "tar_gz_bytes": sum(e["bytes"] for e in entries(gz_dir))}
    gzip = {"stream_samples_per_s": round(gz["samples_per_s"], 1),
            "read_only_samples_per_s": round(best_rate(lambda: tar_read_rate(gz_dir)), 1),
            "read_verified_samples_per_s": round(best_rate(lambda: tar_read_rate(gz_dir, True)), 1), **sizes}
    memory = large_shard_memory(build_shards(args.corpus, args.lines, work, per_shard=args.lines), tokenizer)
    train = time_training(shard_dir, work, args.steps)
    ratio = plain["samples_per_s"] / train["sentences_per_s"]
    return {"stream_samples_per_s": round(plain["samples_per_s"], 1),
            "train_sentences_per_s": round(train["sentences_per_s"], 2), "ratio_stream_over_train": round(ratio, 1),
            "meets_10x_target": ratio >= 10,
            "stream": {**plain, "num_workers": stream.num_workers, "batch_size": BATCH, "max_length": MAX_LENGTH,
                       "shuffle_buffer": stream.shuffle_buffer},
            "tar_read_only_samples_per_s": round(read, 1), "tar_read_verified_samples_per_s": round(verified, 1),
            "sha256_cost_fraction_of_read": round(1 - verified / read, 3), "sha256_mb_per_s": round(sha, 1),
            # hashing time per sample over stream time per sample: the verification's share of the stream
            "sha256_share_of_stream_time": round(sizes["tar_bytes"] / 2**20 / sha / plain["seconds"], 4),
            "gzip_shards": gzip, "large_shard_memory": memory, "train": train, "corpus_lines": args.lines,
            "machine": machine()}


def main() -> int:
    p = parser(__doc__, corpus=corpus(), steps=5)
    p.add_argument("--lines", type=int, default=100_000, help="corpus head to shard")
    p.add_argument("--epochs", type=int, default=1, help="stream epochs timed")
    p.add_argument("--work-dir", type=Path, default=None, help="shard cache (default: a temporary folder)")
    p.add_argument("--output", type=Path, default=None,
                   help="default bench/results/data_throughput.json (data_sources.json with --sources)")
    p.add_argument("--sources", action="store_true", help="compare local tar, .tar.gz, loopback HTTP and pipe:cat")
    args = p.parse_args()
    need_file(args.corpus)
    cpu_only()  # the CPU step
    tokenizer = transformers.AutoTokenizer.from_pretrained(MINILM)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        shards = build_shards(args.corpus, args.lines, work), build_shards(args.corpus, args.lines, work, True)
        result = (sources if args.sources else pipeline)(args, tokenizer, work, *shards)
    write(args.output or RESULTS / ("data_sources.json" if args.sources else "data_throughput.json"), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
