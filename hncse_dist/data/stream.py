"""ShardStream: tokenized, fixed-size, exactly-counted batches from tar shards, per rank.

Guarantees (see plan.py for the exact sample order):

- every rank yields exactly ``batches_per_epoch = total // (world_size * batch_size)``
  batches per epoch, each with exactly ``batch_size`` rows, so collectives never hang;
- in exact mode every sample is seen at most once per epoch across all ranks, and all but
  the dropped tail (fewer than ``world_size * batch_size`` samples, a different tail every
  epoch since the shard order is reshuffled) exactly once;
- the sequence of batches is independent of ``num_workers``; ``state_dict()`` counts
  batches handed to the consumer (not those prefetched by workers), so loading it into a
  fresh stream continues with exactly the batches an uninterrupted run would have yielded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .mixture import (
    exact_mixture_segments,
    is_plain,
    mixture_epoch_size,
    parse_sources,
    resampled_mixture_segments,
)
from .manifest import ShardInfo, check_shard, load_manifest, shard_infos
from .plan import (
    Segment,
    batches_per_epoch,
    block_permutation,
    block_size_for,
    derive_seed,
    exact_rank_segments,
    resampled_rank_segments,
    slice_segments,
)
from .tario import ShardError, ShardReader
from .urls import is_remote, is_url_source, remote_infos, with_retries
from ..bank import sentence_keys

log = logging.getLogger(__name__)

STATE_VERSION = 1
Batch = dict[str, Any]


# ----------------------------------------------------------------------------- worker side


@dataclass(frozen=True)
class _EpochPlan:
    """Everything a worker needs to produce its share of one rank's epoch (picklable)."""

    paths: tuple[str, ...]
    counts: tuple[int, ...]  # manifest sample counts and sha256s: every shard read is verified
    shas: tuple[str | None, ...]
    segments: tuple[Segment, ...]
    batch_size: int
    block_size: int
    max_length: int
    seed: int
    epoch: int
    rank: int
    shuffle: bool
    start_batch: int
    text_keys: tuple[str | None, ...] = ()  # per shard: the member (or JSON field) holding the text
    shard_retries: int = 0  # reopen a URL / pipe: shard this many times after a failure
    retry_delay: float = 1.0  # seconds before the first retry, doubled after each

    @property
    def span(self) -> int:
        return sum(s.count for s in self.segments)

    @property
    def batches_per_block(self) -> int:
        return self.block_size // self.batch_size


class _SegmentReader:
    """Reads segments in order, keeping the current shard open across adjacent segments.

    A shard is checked against its manifest sha256 when its last sample is read, or, when
    this reader leaves it earlier, by reading on to its end first (``close``): every shard
    a worker opens is verified, including the part-read one before an epoch's dropped tail.
    """

    def __init__(self, plan: _EpochPlan) -> None:
        self._plan = plan
        self._reader: ShardReader | None = None

    def read(self, seg: Segment) -> list[tuple[str, str]]:
        path = self._plan.paths[seg.shard]
        if not is_remote(path) or not self._plan.shard_retries:
            return self._read_once(seg)
        # A remote shard is reopened from its start and read up to the same sample: the
        # samples are the same, so a retry changes nothing but the time taken.
        def again() -> list[tuple[str, str]]:
            try:
                return self._read_once(seg)
            except ShardError:
                self._drop()
                raise

        return with_retries(path, again, self._plan.shard_retries, self._plan.retry_delay)

    def _read_once(self, seg: Segment) -> list[tuple[str, str]]:
        path = self._plan.paths[seg.shard]
        reader = self._reader
        if reader is None or reader.path != path or reader.position > seg.start:
            self.close(verify=True)
            reader = self._reader = ShardReader(
                path, count=self._plan.counts[seg.shard], sha256=self._plan.shas[seg.shard],
                text_key=self._plan.text_keys[seg.shard] if self._plan.text_keys else None,
            )
        reader.skip(seg.start - reader.position)
        return reader.read(seg.count)

    def _drop(self) -> None:
        """Forget the current (failed) shard without verifying the rest of it."""
        if self._reader is not None:
            reader, self._reader = self._reader, None
            with contextlib.suppress(Exception):
                reader.close()

    def close(self, verify: bool = False) -> None:
        if self._reader is not None:
            reader, self._reader = self._reader, None
            reader.close(verify=verify)


class _EpochBatches(IterableDataset):
    """Produces (index, batch) for the blocks assigned to this DataLoader worker.

    Blocks go to workers round-robin (block b -> worker b % num_workers); each block is
    read whole and shuffled with its own seed, so any worker can produce any block
    identically and a resumed epoch only re-reads the block it stopped in.
    """

    def __init__(self, plan: _EpochPlan, tokenizer: Any) -> None:
        super().__init__()
        self.plan = plan
        self.tokenizer = tokenizer

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        plan = self.plan
        n_blocks = math.ceil(plan.span / plan.block_size)
        first_block = plan.start_batch // plan.batches_per_block
        reader = _SegmentReader(plan)
        try:
            for block in range(first_block, n_blocks):
                if block % n_workers == worker:
                    yield from self._block_batches(block, reader)
            reader.close(verify=True)
        finally:
            reader.close()

    def _block_batches(self, block: int, reader: _SegmentReader) -> Iterator[Batch]:
        plan = self.plan
        lo = block * plan.block_size
        size = min(plan.block_size, plan.span - lo)
        samples = [s for seg in slice_segments(plan.segments, lo, size) for s in reader.read(seg)]
        order = block_permutation(size, plan.seed, plan.epoch, plan.rank, block, plan.shuffle)
        samples = [samples[i] for i in order]
        for i in range(size // plan.batch_size):
            index = block * plan.batches_per_block + i
            if index >= plan.start_batch:
                yield self._tokenize(samples[i * plan.batch_size : (i + 1) * plan.batch_size], index)

    def _tokenize(self, samples: list[tuple[str, str]], index: int) -> Batch:
        return {**tokenize_batch(self.tokenizer, [text for _, text in samples], self.plan.max_length),
                "keys": [key for key, _ in samples], "index": index}


def tokenize_batch(tokenizer, texts: list[str], max_length: int) -> Batch:
    """The tensors of a batch as the loader's workers build them (``Trainer.micro_batch`` takes them)."""
    encoded = tokenizer(texts, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    ids, mask = encoded["input_ids"].long(), encoded["attention_mask"].long()
    return {
        "input_ids": ids,
        "attention_mask": mask,
        # Built here, in the loader's worker, so that the training step needs no host work:
        # the bank's duplicate masking compares these token hashes, the metrics count tokens.
        "sentence_keys": sentence_keys(ids, mask),
        "tokens": int(mask.sum()),
    }


def _keep_as_is(batch: Batch) -> Batch:
    return batch


def _die_with_server(worker_id: int) -> None:
    """In each DataLoader worker: SIGKILL when its parent (the fork server, or the rank under
    plain fork) dies; see ``forkserver_guard``."""
    import signal

    from ..launcher import die_with_parent

    die_with_parent(signal.SIGKILL)


def _in_index_order(batches: Iterable[Batch], first: int) -> Iterator[Batch]:
    """Yield batches sorted by their ``index``, starting at ``first``.

    DataLoader interleaves workers batch by batch while blocks are assigned whole, so a few
    blocks' worth of batches wait here; they are small (token ids only).
    """
    pending: dict[int, Batch] = {}
    expected = first
    for batch in batches:
        pending[batch["index"]] = batch
        while expected in pending:
            yield pending.pop(expected)
            expected += 1
    if pending:
        raise RuntimeError(f"data pipeline lost batch {expected}; got {sorted(pending)[:5]}...")


# ----------------------------------------------------------------------------- main side


def _stop_workers(source: Iterator[Batch]) -> None:
    """Shut DataLoader workers down now rather than whenever the iterator is collected.

    After an error the traceback keeps the iterator alive, and a shutdown left to garbage
    collection waits seconds per worker.
    """
    shutdown = getattr(source, "_shutdown_workers", None)
    if callable(shutdown):
        shutdown()


def _worker_error_summary(exc: ShardError) -> str | None:
    """The worker's own message when DataLoader re-raised it behind a traceback."""
    marker = "ShardError: "
    text = str(exc)
    if "DataLoader worker" not in text or marker not in text:
        return None
    return text.rsplit(marker, 1)[1].strip() + " (raised in a DataLoader worker)"


def check_remote_shard(info: ShardInfo, text_key: str | None) -> str | None:
    """Why a URL / pattern shard cannot be used as its manifest says (one full read), or None."""
    try:
        with ShardReader(info.path, count=info.count, sha256=info.sha256, text_key=text_key) as reader:
            reader.read(info.count)
            if not reader.finished:
                reader.finish()
    except ShardError as exc:
        return str(exc)
    return None


def _usable_shards(
    shard_dir: str, skip_corrupt: bool, manifest: str | None = None, text_key: str | None = None
) -> tuple[list[ShardInfo], list[ShardInfo], list[str], str | None]:
    """Shards to read, the skipped ones, why, and the text_key (given, or the manifest's);
    raise on problems unless skipping.

    The same checks run on every rank over the same files, so every rank skips the same
    shards and the batch count stays equal. With skip_corrupt every shard's sha256 is
    verified here (one full read of the corpus per rank, at construction): a shard found
    altered only while it is streamed could not be left out without unequal batch counts
    across ranks, so streaming verification stops the run in either mode.
    """
    if is_url_source(shard_dir):
        infos, recorded_key = remote_infos(shard_dir, manifest)
        text_key = text_key or recorded_key
        problems = {info.path: check_remote_shard(info, text_key) if skip_corrupt else None for info in infos}
    else:
        loaded = load_manifest(shard_dir)
        infos, text_key = shard_infos(shard_dir, loaded), text_key or loaded.get("text_key")
        problems = {info.path: check_shard(info, verify_sha=skip_corrupt) for info in infos}
    bad = [p for p in problems.values() if p]
    if bad and not skip_corrupt:
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise ShardError(
            "; ".join(bad[:3]) + more + ". Fix: rebuild with `hncse-dist shards`, or set skip_corrupt=true "
            "to train without such shards"
        )
    for problem in bad:
        log.warning("skipping shard: %s", problem)
    return [i for i in infos if not problems[i.path]], [i for i in infos if problems[i.path]], bad, text_key


def _dataset_fingerprint(infos: list[ShardInfo], weights: list[float] | None = None) -> str:
    listing: list[Any] = [(os.path.basename(i.path), i.count) for i in infos]
    if weights is not None:
        listing.append(("weights", weights))
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]


class ShardStream:
    """Per-rank iterable of tokenized batches over a shard directory (see module docstring).

    Iterating yields the rest of the current epoch as dicts with ``input_ids`` and
    ``attention_mask`` (LongTensor [batch_size, L], padded to the longest row, truncated
    at ``max_length``), ``sentence_keys`` (int64 [batch_size]: a hash of each row's tokens,
    ``bank.sentence_keys``), ``tokens`` (real tokens in the batch, an int) and ``keys`` (list
    of sample keys); when an epoch is fully consumed
    the stream moves on to the next one, so ``for batch in stream`` repeated gives
    successive epochs. ``set_epoch(e)`` jumps to the start of epoch ``e`` (keeping the
    position when ``e`` is already the current epoch, so a resumed run may call it).
    """

    def __init__(
        self,
        shard_dir: str,
        tokenizer: Any,
        batch_size: int,
        max_length: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 2,
        shuffle_buffer: int = 1000,
        resampled: bool = False,
        skip_corrupt: bool = False,
        prefetch_factor: int = 2,
        worker_start: str | None = None,
        manifest: str | None = None,
        text_key: str | None = None,
        shard_retries: int = 0,
        retry_delay: float = 1.0,
        pin_memory: bool = False,
    ) -> None:
        if batch_size < 1 or max_length < 1:
            raise ValueError(f"batch_size and max_length must be >= 1, got {batch_size}, {max_length}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if getattr(tokenizer, "pad_token", "") is None:
            # Batches are padded in the workers: say it here, not in a worker's traceback.
            raise ValueError(
                "tokenizer has no pad token to pad batches with: set one (tokenizer.pad_token = "
                "tokenizer.eos_token), or take the tokenizer of Encoder.from_pretrained, which does"
            )
        self.shard_dir = shard_dir
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.resampled = resampled
        self.prefetch_factor = prefetch_factor
        # "forkserver": workers fork from a clean server process instead of from the caller, so
        # they never share (and, once the caller updates it, duplicate) a model's pages. None:
        # the platform default (fork on Linux).
        self.worker_start = worker_start
        self.manifest = manifest
        self.shard_retries = shard_retries
        self.retry_delay = retry_delay
        self.pin_memory = pin_memory
        sources = parse_sources(shard_dir)
        if len(sources) == 1:
            sources = [replace(sources[0], manifest=sources[0].manifest or manifest,
                               text_key=sources[0].text_key or text_key)]
        self._shards, skipped, self.skipped_shards, self._text_keys, self._source_of = [], [], [], [], []
        for index, source in enumerate(sources):
            usable, left_out, why, key = _usable_shards(
                source.path, skip_corrupt, source.manifest, source.text_key or text_key
            )
            self._shards += usable
            skipped += left_out
            self.skipped_shards += why
            self._text_keys += [key] * len(usable)
            self._source_of += [index] * len(usable)
        self._weights = [s.weight for s in sources]
        self._mixture = not is_plain(sources)
        self.skipped_samples = sum(i.count for i in skipped)
        counts = [i.count for i in self._shards]
        self.total_samples = mixture_epoch_size(counts, self._source_of, self._weights) if self._mixture else sum(counts)
        self._batches_per_epoch = batches_per_epoch(self.total_samples, batch_size, world_size)
        if self._batches_per_epoch == 0:
            raise ValueError(
                f"{shard_dir} holds {self.total_samples} usable samples, fewer than one global batch "
                f"(world_size {world_size} x batch_size {batch_size}); use more data or a smaller batch"
            )
        self._block_size = block_size_for(shuffle_buffer, batch_size)
        self._fingerprint = _dataset_fingerprint(self._shards, self._weights if self._mixture else None)
        self._epoch = 0
        self._consumed = 0

    def skip_report(self) -> str:
        """One line: how many shards (and samples) skip_corrupt left out, and the first reason."""
        n = len(self.skipped_shards)
        first = f"; first: {self.skipped_shards[0]}" if n else ""
        return (f"skip_corrupt: skipped {n} of {n + len(self._shards)} shards "
                f"({self.skipped_samples} samples){first}")

    # -- position ---------------------------------------------------------------------

    @property
    def batches_per_epoch(self) -> int:
        """Batches every rank yields per epoch: total // (world_size * batch_size)."""
        return self._batches_per_epoch

    @property
    def dropped_per_epoch(self) -> int:
        """Samples left out of each exact epoch (the tail that cannot fill a global step)."""
        return self.total_samples - self._batches_per_epoch * self.batch_size * self.world_size

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def batches_consumed(self) -> int:
        return self._consumed

    def __len__(self) -> int:
        return self._batches_per_epoch

    def set_epoch(self, epoch: int) -> None:
        if epoch != self._epoch:
            self._epoch, self._consumed = epoch, 0

    def _normalized_position(self) -> tuple[int, int]:
        if self._consumed >= self._batches_per_epoch:
            return self._epoch + 1, 0
        return self._epoch, self._consumed

    # -- iteration --------------------------------------------------------------------

    def _plan(self, epoch: int, start_batch: int) -> _EpochPlan:
        per_rank = self._batches_per_epoch * self.batch_size
        counts = [i.count for i in self._shards]
        if self._mixture:
            mix = resampled_mixture_segments if self.resampled else exact_mixture_segments
            segments = mix(counts, self._source_of, self._weights, self.seed, epoch, self.rank, per_rank)
        else:
            make_segments = resampled_rank_segments if self.resampled else exact_rank_segments
            segments = make_segments(counts, self.seed, epoch, self.rank, per_rank)
        return _EpochPlan(
            paths=tuple(i.path for i in self._shards),
            counts=tuple(i.count for i in self._shards),
            shas=tuple(i.sha256 for i in self._shards),
            segments=tuple(segments),
            batch_size=self.batch_size,
            block_size=self._block_size,
            max_length=self.max_length,
            seed=self.seed,
            epoch=epoch,
            rank=self.rank,
            shuffle=self.shuffle_buffer > 1,
            start_batch=start_batch,
            text_keys=tuple(self._text_keys),
            shard_retries=self.shard_retries,
            retry_delay=self.retry_delay,
        )

    def _loader(self, dataset: _EpochBatches) -> DataLoader:
        # Tokenizers' own thread pool inside forked workers deadlocks or warns; workers
        # already give the parallelism.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        return DataLoader(
            dataset,
            batch_size=None,
            num_workers=self.num_workers,
            collate_fn=_keep_as_is,
            prefetch_factor=self.prefetch_factor,
            persistent_workers=False,
            pin_memory=self.pin_memory,  # page-locked batches: non-blocking copies to the GPU
            multiprocessing_context=self._worker_context(),
            worker_init_fn=_die_with_server,
            # Its own generator: starting the workers draws their base seed from it, not from
            # torch's global RNG, whose state (dropout) must not depend on when an epoch's
            # loader starts -- a resumed run starts one mid-epoch.
            generator=torch.Generator().manual_seed(derive_seed("loader", self.seed, self._epoch) % 2**63),
        )

    def _worker_context(self):
        if self.worker_start is None:
            return None
        import multiprocessing

        ctx = multiprocessing.get_context(self.worker_start)
        if self.worker_start == "forkserver":
            # The server imports torch once, not every worker; the guard ends it with the rank.
            ctx.set_forkserver_preload([__name__, f"{__package__}.forkserver_guard"])
        return ctx

    def __iter__(self) -> Iterator[Batch]:
        self._epoch, self._consumed = self._normalized_position()
        epoch, start = self._epoch, self._consumed
        dataset = _EpochBatches(self._plan(epoch, start), self.tokenizer)
        source = iter(dataset) if self.num_workers == 0 else iter(self._loader(dataset))
        try:
            for batch in _in_index_order(source, start):
                # Count before handing over: while the consumer holds batch k, k+1 are consumed.
                self._consumed = batch.pop("index") + 1
                yield batch
        except ShardError as exc:
            summary = _worker_error_summary(exc)
            if summary is None:
                raise
            raise ShardError(summary) from exc
        finally:
            _stop_workers(source)
        if self._consumed != self._batches_per_epoch:
            raise RuntimeError(
                f"rank {self.rank} produced {self._consumed} of {self._batches_per_epoch} batches in "
                f"epoch {epoch}; refusing to continue with unequal batch counts"
            )
        self._epoch, self._consumed = epoch + 1, 0

    def forever(self) -> Iterator[Batch]:
        """Endless batches across epochs (for step-based training, e.g. resampled mode)."""
        while True:
            yield from self

    # -- checkpointing ----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Position after the batches handed out so far; identical on every rank."""
        epoch, consumed = self._normalized_position()
        return {
            "version": STATE_VERSION,
            "epoch": epoch,
            "batches_consumed": consumed,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "block_size": self._block_size,
            "resampled": self.resampled,
            "dataset": self._fingerprint,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``. Exact mode needs the same world size, batch size, seed,
        shuffle block and shards; resampled mode accepts changes and resumes statistically
        at the same fraction of the epoch."""
        missing = {"epoch", "batches_consumed", "world_size", "batch_size", "seed"} - state.keys()
        if missing:
            raise ValueError(f"not a ShardStream state (missing {sorted(missing)})")
        if self.resampled:
            self._epoch, self._consumed = state["epoch"], self._rescaled_position(state)
            return
        self._refuse_mismatch(state)
        self._epoch, self._consumed = state["epoch"], state["batches_consumed"]

    def _rescaled_position(self, state: dict[str, Any]) -> int:
        samples_done = state["batches_consumed"] * state["batch_size"] * state["world_size"]
        return min(samples_done // (self.batch_size * self.world_size), self._batches_per_epoch)

    def _refuse_mismatch(self, state: dict[str, Any]) -> None:
        current = self.state_dict()
        for key in ("world_size", "batch_size", "seed", "block_size", "dataset"):
            if key in state and state[key] != current[key]:
                hint = (
                    " (exact resume needs the world size it was saved with; relaunch with "
                    f"{state[key]} processes, or set resampled=true for a statistical resume)"
                    if key == "world_size"
                    else "; exact resume needs the same data settings (or set resampled=true)"
                )
                raise ValueError(
                    f"cannot resume data position: checkpoint has {key}={state[key]!r}, "
                    f"this run has {current[key]!r}{hint}"
                )
        if state.get("resampled"):
            raise ValueError("checkpoint data position is from resampled mode; set resampled=true to resume it")
