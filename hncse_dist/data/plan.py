"""Pure functions that decide which samples each rank reads in an epoch.

The sample order of a rank is a function of (manifest counts, seed, epoch, rank,
world_size, batch_size, block size) only; worker count and timing never change it. That
is what makes the position "k batches consumed" enough to resume exactly.

Exact (non-resampled) epoch, ``P = batches_per_epoch * batch_size`` samples per rank:

1. shuffle the shard order with seed (seed, epoch), identical on every rank;
2. concatenate the shards in that order into one global sample sequence;
3. rank r takes positions [r*P, (r+1)*P); the tail ``total - world_size*P`` (less than
   one global step, world_size*batch_size) is dropped -- a different tail every epoch;
4. cut the rank's span into blocks of ``block_size`` samples (a multiple of batch_size),
   shuffle each block with seed (seed, epoch, rank, block), cut into batches.

Resampled epoch: rank r draws shards with replacement (seed (seed, epoch, rank)) until it
has P samples, then steps 4 on; samples may repeat, counts are still exact.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Segment:
    """``count`` consecutive samples of shard number ``shard`` starting at sample ``start``."""

    shard: int
    start: int
    count: int


def derive_seed(*parts: object) -> int:
    """A 64-bit seed from parts, stable across processes and Python versions (unlike hash())."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def batches_per_epoch(total: int, batch_size: int, world_size: int) -> int:
    return total // (batch_size * world_size)


def block_size_for(shuffle_buffer: int, batch_size: int) -> int:
    """Shuffle block size: at least one batch, rounded up to whole batches."""
    return max(1, math.ceil(max(shuffle_buffer, 1) / batch_size)) * batch_size


def shard_order(n_shards: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n_shards))
    random.Random(derive_seed("shard-order", seed, epoch)).shuffle(order)
    return order


def slice_segments(segments: Sequence[Segment], start: int, count: int) -> list[Segment]:
    """The sub-sequence [start, start+count) of the concatenation of ``segments``."""
    out: list[Segment] = []
    offset = 0
    end = start + count
    for seg in segments:
        lo, hi = max(start, offset), min(end, offset + seg.count)
        if lo < hi:
            out.append(Segment(seg.shard, seg.start + lo - offset, hi - lo))
        offset += seg.count
        if offset >= end:
            break
    if sum(s.count for s in out) != count:
        raise ValueError(f"segments hold fewer than {end} samples")
    return out


def exact_rank_segments(
    counts: Sequence[int], seed: int, epoch: int, rank: int, samples_per_rank: int
) -> list[Segment]:
    whole = [Segment(i, 0, counts[i]) for i in shard_order(len(counts), seed, epoch) if counts[i] > 0]
    return slice_segments(whole, rank * samples_per_rank, samples_per_rank)


def resampled_rank_segments(
    counts: Sequence[int], seed: int, epoch: int, rank: int, samples_per_rank: int
) -> list[Segment]:
    usable = [i for i, c in enumerate(counts) if c > 0]
    rng = random.Random(derive_seed("resample", seed, epoch, rank))
    drawn: list[Segment] = []
    have = 0
    while have < samples_per_rank:
        shard = rng.choice(usable)
        drawn.append(Segment(shard, 0, counts[shard]))
        have += counts[shard]
    return slice_segments(drawn, 0, samples_per_rank)


def block_permutation(size: int, seed: int, epoch: int, rank: int, block: int, shuffle: bool) -> list[int]:
    order = list(range(size))
    if shuffle:
        random.Random(derive_seed("block", seed, epoch, rank, block)).shuffle(order)
    return order
