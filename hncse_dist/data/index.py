"""``hncse-dist shards --index``: a manifest for WebDataset shards written elsewhere.

Each shard is streamed once, front to back (a URL is never seeked): its samples are counted
with the chosen ``text_key`` (so a shard whose samples lack that field is refused here, not
half-way through training), and its size and sha256 are taken from the same bytes.
"""

from __future__ import annotations

import glob
import os
import sys
from datetime import datetime, timezone
from typing import Any

from .manifest import MANIFEST_NAME, MANIFEST_FORMAT, MANIFEST_VERSION, write_json_atomic
from .tario import ShardError, ShardReader, parse_text_key
from .urls import SHARD_SUFFIXES, expand_source, is_remote, shard_basename, with_retries


def _index_one(url: str, text_key: str | None) -> dict[str, Any]:
    with ShardReader(url, text_key=text_key) as reader:
        count = sum(1 for _ in reader)
        sha, size = reader.finish()
    entry: dict[str, Any] = {"name": shard_basename(url), "count": count, "sha256": sha, "bytes": size}
    if is_remote(url):
        entry["url"] = url
    return entry


def _targets(spec: str, manifest_out: str | None) -> tuple[list[str], str]:
    """The shards to index and where the manifest goes."""
    if os.path.isdir(spec):
        paths = sorted(p for p in glob.glob(os.path.join(spec, "*")) if p.endswith(SHARD_SUFFIXES))
        if not paths:
            raise FileNotFoundError(f"no .tar / .tar.gz / .tgz files in {spec}")
        return paths, manifest_out or os.path.join(spec, MANIFEST_NAME)
    urls = expand_source(spec)
    if manifest_out:
        return urls, manifest_out
    folders = {os.path.dirname(os.path.abspath(u)) for u in urls if not is_remote(u)}
    if len(folders) == 1 and not any(is_remote(u) for u in urls):
        return urls, os.path.join(folders.pop(), MANIFEST_NAME)
    raise ValueError(
        f"--index {spec}: pass --manifest-out FILE (a manifest cannot be written beside URL shards); "
        "then train with train_manifest=FILE, or upload FILE as manifest.json beside the shards"
    )


def index_source(
    spec: str, text_key: str | None = None, manifest_out: str | None = None, retries: int = 3
) -> tuple[dict[str, Any], str]:
    """Index a folder, pattern, URL list or pipe: source; returns (manifest, path written)."""
    parse_text_key(text_key)  # refuse a malformed key before reading anything
    urls, out = _targets(spec, manifest_out)
    names = [shard_basename(u) for u in urls]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise ValueError(f"--index {spec}: two shards are named {dup}; manifests match shards by file name")
    shards = [with_retries(u, lambda u=u: _index_one(u, text_key), retries if is_remote(u) else 0) for u in urls]
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "total": sum(e["count"] for e in shards),
        "shards": shards,
        "sources": [{"indexed": spec if is_remote(spec) else os.path.abspath(spec)}],
    }
    if text_key:
        manifest["text_key"] = text_key
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    write_json_atomic(out, manifest)
    return manifest, out


def index_main(spec: str, text_key: str | None = None, manifest_out: str | None = None) -> int:
    try:
        manifest, out = index_source(spec, text_key, manifest_out)
    except (FileNotFoundError, ValueError, ShardError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"indexed {manifest['total']} samples in {len(manifest['shards'])} shards")
    print(f"manifest: {out}")
    return 0
