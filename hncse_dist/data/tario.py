"""Reading and writing WebDataset-style tar shards of text samples.

A sample is a group of consecutive tar members sharing a key (the member name up to the
first dot of its base name); the text lives in the ``.txt`` member. The writer emits one
``<key>.txt`` member per sample with fixed metadata so the same samples always give the
same bytes (and the same sha256), which is what makes resumable shard writing verifiable.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import tarfile
from collections.abc import Iterable, Iterator
from typing import BinaryIO

TEXT_EXTENSIONS = ("txt", "text")


class ShardError(RuntimeError):
    """A shard (or its manifest) is missing, truncated, corrupt or inconsistent."""


class _HashingFile:
    """Write-only file wrapper that hashes and counts what passes through."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self._raw.write(data)
        self.sha256.update(data)
        self.size += len(data)
        return len(data)

    def tell(self) -> int:
        return self.size


def _text_member(key: str, payload: bytes) -> tarfile.TarInfo:
    # Fixed owner, mode and mtime: the archive bytes depend only on the samples.
    info = tarfile.TarInfo(name=f"{key}.txt")
    info.size = len(payload)
    info.mode = 0o444
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def write_text_tar(samples: Iterable[tuple[str, str]], path: str) -> tuple[int, str, int]:
    """Write ``(key, text)`` samples to ``path`` atomically; gzip-compressed when ``path`` ends
    in ``.gz`` (fixed gzip header: the bytes still depend only on the samples).

    Returns ``(count, sha256_hex, size_bytes)`` of the file as written.
    """
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f".{name}.tmp-{os.getpid()}")
    count = 0
    try:
        with open(tmp, "wb") as raw:
            hashing = _HashingFile(raw)
            with contextlib.ExitStack() as stack:
                sink: BinaryIO = hashing  # type: ignore[assignment]
                if path.endswith(".gz"):
                    sink = stack.enter_context(gzip.GzipFile(filename="", mode="wb", fileobj=sink, mtime=0))
                tar = stack.enter_context(tarfile.open(fileobj=sink, mode="w", format=tarfile.USTAR_FORMAT))
                for key, text in samples:
                    payload = text.encode("utf-8")
                    tar.addfile(_text_member(key, payload), io.BytesIO(payload))
                    count += 1
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return count, hashing.sha256.hexdigest(), hashing.size


def sha256_file(path: str, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def split_member_name(name: str) -> tuple[str, str]:
    """``dir/abc.txt`` -> (``dir/abc``, ``txt``), the WebDataset key convention."""
    directory, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext


class ShardReader:
    """Forward-only reader over the samples of one tar shard.

    ``skip`` walks headers without reading payloads, so jumping to a sample offset costs a
    header scan, not a full read. Every tar problem is re-raised as ShardError naming the
    file: Python's tarfile treats a damaged header mid-archive as end of archive, so callers
    must also compare the number of samples read with the manifest (``expect``).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.position = 0
        self._peeked: tarfile.TarInfo | None = None
        mode = "r:gz" if path.endswith((".tar.gz", ".tgz")) else "r:"
        try:
            self._tar = tarfile.open(path, mode=mode)
        except FileNotFoundError:
            raise ShardError(f"shard not found: {path}") from None
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise ShardError(f"corrupt or empty shard {path}: {exc}") from None

    def close(self) -> None:
        self._tar.close()

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _next_member(self) -> tarfile.TarInfo | None:
        if self._peeked is not None:
            member, self._peeked = self._peeked, None
            return member
        try:
            while (member := self._tar.next()) is not None and not member.isfile():
                continue
            return member
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise ShardError(
                f"corrupt or truncated shard {self.path} after {self.position} samples: {exc}"
            ) from None

    def _next_group(self, want_text: bool = True) -> tuple[str, dict[str, bytes]] | None:
        """The next sample's key and the payloads of its text members (empty when not
        ``want_text``). Payloads are read before the next header, so access only moves
        forward: a gzip shard is never rewound (which would re-decompress it from the start)."""
        first = self._next_member()
        if first is None:
            return None
        key, _ = split_member_name(first.name)
        texts: dict[str, bytes] = {}
        member: tarfile.TarInfo | None = first
        while member is not None:
            ext = split_member_name(member.name)[1]
            if want_text and ext in TEXT_EXTENSIONS and ext not in texts:
                texts[ext] = self._read_payload(key, member)
            member = self._next_member()
            if member is not None and split_member_name(member.name)[0] != key:
                self._peeked = member
                break
        self.position += 1
        return key, texts

    def _read_payload(self, key: str, member: tarfile.TarInfo) -> bytes:
        try:
            return self._tar.extractfile(member).read()  # type: ignore[union-attr]
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise ShardError(f"corrupt or truncated shard {self.path} at {key!r}: {exc}") from None

    def _payload_text(self, key: str, texts: dict[str, bytes]) -> str:
        data = next((texts[e] for e in TEXT_EXTENSIONS if e in texts), None)
        if data is None:
            raise ShardError(f"shard {self.path}: sample {key!r} has no .txt member")
        return data.decode("utf-8", errors="replace")

    def skip(self, n: int) -> None:
        for _ in range(n):
            if self._next_group(want_text=False) is None:
                raise ShardError(
                    f"shard {self.path} ended after {self.position} samples while skipping; "
                    "it is truncated or corrupt (rebuild it with `hncse-dist shards`)"
                )

    def read(self, n: int) -> list[tuple[str, str]]:
        out = []
        for _ in range(n):
            group = self._next_group()
            if group is None:
                raise ShardError(
                    f"shard {self.path} ended after {self.position} samples, expected more; "
                    "it is truncated or corrupt (rebuild it with `hncse-dist shards`)"
                )
            out.append((group[0], self._payload_text(*group)))
        return out

    def __iter__(self) -> Iterator[tuple[str, str]]:
        while (group := self._next_group()) is not None:
            yield group[0], self._payload_text(*group)
