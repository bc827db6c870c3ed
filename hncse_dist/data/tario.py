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
import json
import os
import tarfile
from collections.abc import Iterable, Iterator
from typing import Any, BinaryIO

from .base import ShardError  # noqa: F401  (also imported from here)

TEXT_EXTENSIONS = ("txt", "text")


def parse_text_key(text_key: str | None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``text_key`` -> (member extensions to read, JSON path inside the member).

    None: the ``.txt`` (or ``.text``) member. ``caption``: the ``.caption`` member.
    ``json:meta.sentence``: the field ``meta.sentence`` of the ``.json`` member.
    """
    if not text_key:
        return TEXT_EXTENSIONS, ()
    ext, sep, path = text_key.partition(":")
    if not ext or (sep and not path) or "/" in ext:
        raise ValueError(f"text_key={text_key!r}: use a member extension (txt, caption) or EXT:FIELD.PATH (json:text)")
    return (ext,), tuple(path.split(".")) if path else ()


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


class _HashingReader:
    """Forward-only file view that hashes every byte of the file in order, exactly once.

    The file is read in large chunks, each hashed as it arrives; ``read`` serves slices of
    the current chunk and ``seek`` may only move forward (skipped bytes are still read and
    hashed). After ``drain`` the digest covers the whole file whatever was skipped.
    """

    def __init__(self, raw: BinaryIO, name: str, chunk_size: int = 1 << 20) -> None:
        self._raw = raw
        self.name = name
        self.sha256 = hashlib.sha256()
        self.size = 0  # bytes read from the file (and hashed)
        self._chunk_size = chunk_size
        self._buf = b""
        self._off = 0
        self._pos = 0  # position seen by the caller

    def _fill(self) -> bool:
        data = self._raw.read(self._chunk_size)
        if not data:
            return False
        self.sha256.update(data)
        self.size += len(data)
        self._buf = self._buf[self._off:] + data
        self._off = 0
        return True

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            while self._fill():
                pass
            n = len(self._buf) - self._off
        while len(self._buf) - self._off < n and self._fill():
            pass
        out = self._buf[self._off : self._off + n]
        self._off += len(out)
        self._pos += len(out)
        return out

    def tell(self) -> int:
        return self._pos

    def peek(self, n: int) -> bytes:
        """The next ``n`` bytes (fewer at the end), without moving."""
        while len(self._buf) - self._off < n and self._fill():
            pass
        return self._buf[self._off : self._off + n]

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence == 1:
            pos += self._pos
        if whence == 2 or pos < self._pos:
            raise OSError(f"{self.name}: shards are read front to back (no backward seek)")
        while pos > self._pos:
            if self._off == len(self._buf) and not self._fill():
                break
            step = min(pos - self._pos, len(self._buf) - self._off)
            self._off += step
            self._pos += step
        return self._pos

    def seekable(self) -> bool:
        return False

    def drain(self) -> None:
        self._buf, self._off = b"", 0
        while self._fill():
            self._buf, self._off = b"", 0

    def close(self) -> None:
        self._raw.close()


class ShardReader:
    """Forward-only reader over the samples of one tar shard.

    The file is read strictly once, front to back, through a sha256 (``_HashingReader``):
    skipping to a sample offset reads past the skipped bytes rather than seeking, so the
    digest covers the whole file whichever samples are used. With ``sha256`` (and ``count``)
    from the manifest, ``finish()`` -- called by ``read`` as soon as the last sample is read,
    and by ``close(verify=True)`` after reading the rest -- compares the digest and raises
    ShardError naming the file when it differs. Memory does not grow with the shard's length:
    tarfile's list of members is emptied as the reader moves on.

    Every tar problem is re-raised as ShardError naming the file: Python's tarfile treats a
    damaged header mid-archive as end of archive, so callers must also compare the number of
    samples read with the manifest (``read`` does, by raising when it runs out).
    """

    def __init__(
        self, path: str, *, count: int | None = None, sha256: str | None = None, text_key: str | None = None
    ) -> None:
        self.path = path
        self.text_key = text_key
        self._exts, self._json_path = parse_text_key(text_key)
        self.position = 0
        self.count = count
        self.expected_sha256 = sha256
        self.finished = False
        self._ended = False  # tarfile reported the archive's end (asking again would seek back)
        self._peeked: tarfile.TarInfo | None = None
        from .urls import open_url  # local paths, URLs, pipe: commands (webdataset's gopen)

        try:
            raw = open_url(path)
        except FileNotFoundError:
            raise ShardError(f"shard not found: {path}") from None
        self._file = _HashingReader(raw, path)
        try:
            # Compression from the first bytes, not the name: a URL or pipe: command need not end in .gz.
            mode = "r:gz" if self._file.peek(2) == b"\x1f\x8b" else "r:"
            self._tar = tarfile.open(fileobj=self._file, mode=mode)  # type: ignore[call-overload]
        except (tarfile.TarError, OSError, EOFError) as exc:
            raw.close()
            raise ShardError(f"corrupt or empty shard {path}: {exc}") from None
        except BaseException:
            raw.close()
            raise
        self._tar.members.clear()

    def close(self, verify: bool = False) -> None:
        """Close the file; with ``verify``, first read the rest and check it (``finish``)."""
        try:
            if verify and not self.finished:
                while self._next_group(want_text=False) is not None:
                    pass
                self.finish()
        finally:
            self._tar.close()
            self._file.close()

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def finish(self) -> tuple[str, int]:
        """Read the bytes after the archive's end and check the whole file against the manifest.

        Returns (sha256 hex, size) of the file. Call after the last sample has been read.
        """
        if self._peeked is not None or (self.count is not None and self._next_member() is not None):
            raise ShardError(
                f"corrupt shard {self.path}: it holds more than the {self.count} samples manifest.json "
                "lists. Fix: rebuild it with `hncse-dist shards` (or re-index foreign shards)"
            )
        if self.count is not None and self.position < self.count:
            raise ShardError(
                f"shard {self.path} ended after {self.position} samples, manifest.json says {self.count}; "
                "it is truncated or corrupt (rebuild it with `hncse-dist shards`)"
            )
        self._file.drain()
        self.finished = True
        digest = self._file.sha256.hexdigest()
        if self.expected_sha256 is not None and digest != self.expected_sha256:
            raise ShardError(
                f"corrupt shard {self.path}: sha256 of its bytes differs from manifest.json (the file "
                f"changed after the manifest was written; {self.position} samples of it were read). "
                "Fix: rebuild it with `hncse-dist shards`, or set skip_corrupt=true to leave such shards out"
            )
        return digest, self._file.size

    def _next_member(self) -> tarfile.TarInfo | None:
        if self._peeked is not None:
            member, self._peeked = self._peeked, None
            return member
        if self._ended:
            return None
        try:
            while (member := self._tar.next()) is not None and not member.isfile():
                continue
            self._ended = member is None
            return member
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise ShardError(
                f"corrupt or truncated shard {self.path} after {self.position} samples: {exc}"
            ) from None
        finally:
            self._tar.members.clear()  # tarfile keeps every TarInfo otherwise (~0.5 KB per member)

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
            if want_text and ext in self._exts and ext not in texts:
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
        data = next((texts[e] for e in self._exts if e in texts), None)
        if data is None:
            hint = "" if self.text_key else "; set text_key (e.g. json:text or caption) to read another member"
            raise ShardError(f"shard {self.path}: sample {key!r} has no .{self._exts[0]} member{hint}")
        if not self._json_path:
            return data.decode("utf-8", errors="replace")
        try:
            value: Any = json.loads(data)
            for part in self._json_path:
                value = value[part]
        except (ValueError, KeyError, TypeError, IndexError):
            raise ShardError(
                f"shard {self.path}: sample {key!r} has no field {'.'.join(self._json_path)!r} in its "
                f".{self._exts[0]} member (text_key={self.text_key})"
            ) from None
        if not isinstance(value, str):
            raise ShardError(f"shard {self.path}: sample {key!r}: text_key={self.text_key} is not a string")
        return value

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
        if self.count is not None and self.position == self.count and not self.finished:
            self.finish()  # before the caller uses the last samples
        return out

    def __iter__(self) -> Iterator[tuple[str, str]]:
        while (group := self._next_group()) is not None:
            yield group[0], self._payload_text(*group)
