"""Data pipeline: text corpora -> tar shards (shards.py) -> per-rank token batches (stream.py)."""

from .manifest import load_manifest
from .shards import ensure_shards, format_report, index_shards, shards_main, write_shards
from .stream import ShardStream
from .tario import ShardError

__all__ = [
    "ShardError",
    "ShardStream",
    "ensure_shards",
    "format_report",
    "index_shards",
    "load_manifest",
    "shards_main",
    "write_shards",
]
