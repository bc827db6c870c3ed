"""The shard directory manifest: what the stream trusts instead of scanning tar files."""

from __future__ import annotations

import json
import os
import re
from typing import Any

from .base import ShardError, ShardInfo  # noqa: F401  (ShardInfo also imported from here)
from .tario import sha256_file

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "hncse-dist-shards"
MANIFEST_VERSION = 1
SHARD_PATTERN = "shard-%06d.tar"
SHARD_NAME_RE = re.compile(r"^shard-\d{6}\.tar(\.gz)?$")


def shard_name(index: int, gzip: bool = False) -> str:
    return SHARD_PATTERN % index + (".gz" if gzip else "")


def write_json_atomic(path: str, payload: dict[str, Any]) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: str) -> dict[str, Any] | None:
    """The parsed file, or None when it is absent or unreadable (a torn write)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def load_manifest(shard_dir: str) -> dict[str, Any]:
    """Load and sanity-check ``shard_dir/manifest.json``; ShardError names what is wrong."""
    path = os.path.join(shard_dir, MANIFEST_NAME)
    if not os.path.isfile(path):
        raise ShardError(
            f"no {MANIFEST_NAME} in {shard_dir}: build the shards with "
            f"`hncse-dist shards --input FILE --output {shard_dir}`"
        )
    manifest = read_json(path)
    if manifest is None or not isinstance(manifest.get("shards"), list):
        raise ShardError(f"unreadable or malformed manifest {path}: rebuild with `hncse-dist shards`")
    for entry in manifest["shards"]:
        if not isinstance(entry, dict) or "name" not in entry or not isinstance(entry.get("count"), int):
            raise ShardError(f"malformed shard entry {entry!r} in {path}")
    return manifest


def shard_path(shard_dir: str, name: Any) -> str:
    """``shard_dir/name``, refusing names that point outside the folder.

    Only relative names without ``..`` components are accepted (sub-folders are fine, and so
    are symbolic links the folder's owner placed there); absolute paths, parent references
    and URLs would let a manifest open arbitrary files (URL shards are named by train_shards
    itself, and their manifest is matched by file name: urls.py).
    """
    reason = None
    if not isinstance(name, str) or not name or "\x00" in name:
        reason = "is not a file name"
    elif re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", name):
        reason = "is a URL; a folder's manifest names files in that folder (put URLs in train_shards)"
    elif os.path.isabs(name) or name.startswith(("/", "\\")):
        reason = "is an absolute path"
    elif ".." in re.split(r"[/\\]", name):
        reason = "leaves the shard folder"
    if reason:
        raise ShardError(
            f"shard name {name!r} in {os.path.join(shard_dir, MANIFEST_NAME)} {reason}: names must be "
            "relative paths inside that folder. Fix: rebuild the manifest with `hncse-dist shards --index DIR`"
        )
    return os.path.join(shard_dir, name)


def shard_infos(shard_dir: str, manifest: dict[str, Any]) -> list[ShardInfo]:
    return [
        ShardInfo(
            path=shard_path(shard_dir, e["name"]),
            count=e["count"],
            sha256=e.get("sha256"),
            size=e.get("bytes"),
        )
        for e in manifest["shards"]
    ]


def check_shard(info: ShardInfo, *, verify_sha: bool = False) -> str | None:
    """Why the shard file cannot be used as the manifest describes it, or None if it can."""
    try:
        size = os.path.getsize(info.path)
    except FileNotFoundError:
        return f"missing shard {info.path} (listed in the manifest)"
    if size == 0 and info.count > 0:
        return f"empty shard file {info.path} (manifest says {info.count} samples)"
    if info.size is not None and size != info.size:
        return f"truncated or altered shard {info.path}: {size} bytes, manifest says {info.size}"
    if verify_sha and info.sha256 and sha256_file(info.path) != info.sha256:
        return f"corrupt shard {info.path}: sha256 differs from the manifest"
    return None
