"""Weighted mixtures of shard sources, and what ``train_shards`` may be.

``train_shards: [{path: wiki/, weight: 1.0}, {path: "https://h/cc-{000..099}.tar", weight: 0.5}]``

A weight is an upsampling factor (open_clip's convention): source ``s`` with ``N_s`` samples
contributes ``floor(w_s * N_s)`` samples to every epoch, so an epoch of the mixture holds
``sum_s floor(w_s * N_s)`` samples -- the same number every epoch, split exactly and equally
over the ranks as for one source (plan.py). Exact mode takes ``floor(w_s)`` full passes over
the source plus, for the fractional part, whole shards in a per-epoch shuffled order and the
head of one more shard: with weight 0.5, a different half of the source each epoch (every
sample at most once per epoch); with weight 2, every sample twice. Resampled mode draws
shards with replacement, a shard of source ``s`` with probability proportional to ``w_s``
(the expected share of source ``s`` is then ``w_s * N_s`` over the whole, as in exact mode).
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .plan import Segment, derive_seed, slice_segments


@dataclass(frozen=True)
class Source:
    path: str
    weight: float = 1.0
    manifest: str | None = None
    text_key: str | None = None


def parse_sources(spec: Any) -> list[Source]:
    """``train_shards`` as a list of sources; ValueError says what is wrong with it."""
    if isinstance(spec, str):
        return [Source(spec)]
    if not isinstance(spec, list) or not spec:
        raise ValueError(
            f"train_shards={spec!r}: use a folder, pattern or URL, or a list of {{path: ..., weight: ...}}"
        )
    out = []
    for item in spec:
        if isinstance(item, str):
            item = {"path": item}
        if not isinstance(item, dict) or not isinstance(item.get("path"), str):
            raise ValueError(f"train_shards entry {item!r}: each source needs a path (and optionally weight)")
        unknown = set(item) - {"path", "weight", "manifest", "text_key"}
        if unknown:
            raise ValueError(f"train_shards entry {item!r}: unknown field(s) {sorted(unknown)}; "
                             "allowed: path, weight, manifest, text_key")
        weight = item.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0 or math.isinf(weight):
            raise ValueError(f"train_shards entry {item!r}: weight must be a number > 0")
        out.append(Source(item["path"], float(weight), item.get("manifest"), item.get("text_key")))
    return out


def is_plain(sources: Sequence[Source]) -> bool:
    """One source with weight 1: the ordinary (non-mixture) plan applies."""
    return len(sources) == 1 and sources[0].weight == 1.0


def check_train_shards(spec: Any) -> None:
    """Refuse what cannot be a source before anything starts (ValueError naming the fix)."""
    from .urls import is_remote

    if spec is None:
        return
    for source in parse_sources(spec):
        path = source.path
        if is_remote(path) or "{" in path or "::" in path:
            continue
        if not os.path.exists(path):
            raise ValueError(
                f"train_shards={path} does not exist: pass a shard folder, a brace pattern, a URL, "
                "pipe:COMMAND or a file listing shards"
            )


def source_quota(weight: float, total: int) -> int:
    return math.floor(weight * total + 1e-9)


def mixture_units(
    counts: Sequence[int], source_of: Sequence[int], weights: Sequence[float], seed: int, epoch: int
) -> list[Segment]:
    """One epoch's segments of the mixture, in epoch order (before splitting across ranks)."""
    units: list[Segment] = []
    for s, weight in enumerate(weights):
        shards = [i for i, src in enumerate(source_of) if src == s and counts[i] > 0]
        total = sum(counts[i] for i in shards)
        passes = math.floor(weight + 1e-9)
        units += [Segment(i, 0, counts[i]) for _ in range(passes) for i in shards]
        rest = source_quota(weight, total) - passes * total
        order = list(shards)
        random.Random(derive_seed("mixture-part", seed, epoch, s)).shuffle(order)
        for i in order:
            if rest <= 0:
                break
            take = min(rest, counts[i])
            units.append(Segment(i, 0, take))
            rest -= take
    random.Random(derive_seed("mixture-order", seed, epoch)).shuffle(units)
    return units


def mixture_epoch_size(counts: Sequence[int], source_of: Sequence[int], weights: Sequence[float]) -> int:
    return sum(
        source_quota(w, sum(c for c, src in zip(counts, source_of) if src == s)) for s, w in enumerate(weights)
    )


def exact_mixture_segments(
    counts: Sequence[int], source_of: Sequence[int], weights: Sequence[float],
    seed: int, epoch: int, rank: int, samples_per_rank: int,
) -> list[Segment]:
    units = mixture_units(counts, source_of, weights, seed, epoch)
    return slice_segments(units, rank * samples_per_rank, samples_per_rank)


def resampled_mixture_segments(
    counts: Sequence[int], source_of: Sequence[int], weights: Sequence[float],
    seed: int, epoch: int, rank: int, samples_per_rank: int,
) -> list[Segment]:
    usable = [i for i, c in enumerate(counts) if c > 0]
    shard_weights = [weights[source_of[i]] for i in usable]
    rng = random.Random(derive_seed("resample-mixture", seed, epoch, rank))
    drawn: list[Segment] = []
    have = 0
    while have < samples_per_rank:
        shard = rng.choices(usable, weights=shard_weights)[0]
        drawn.append(Segment(shard, 0, counts[shard]))
        have += counts[shard]
    return slice_segments(drawn, 0, samples_per_rank)
