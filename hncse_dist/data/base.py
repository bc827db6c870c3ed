"""What every part of the data layer shares: the shard error and a shard's manifest entry."""

from __future__ import annotations

from dataclasses import dataclass


class ShardError(RuntimeError):
    """A shard (or its manifest) is missing, truncated, corrupt or inconsistent."""


@dataclass(frozen=True)
class ShardInfo:
    path: str
    count: int
    sha256: str | None
    size: int | None
