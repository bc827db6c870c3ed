"""Input readers (text, JSONL, CSV/TSV, anything `datasets` opens) and text cleaning.

Every reader yields raw texts and records problems in a Tally instead of raising, so one
bad line never stops a multi-hour conversion; the tally becomes the manifest's report.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import logging
import os
import re
import unicodedata
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

DEFAULT_MAX_LINE_BYTES = 16 << 20
_GZIP_MAGIC = b"\x1f\x8b"
_TEXT_SUFFIXES = (".txt", ".text", ".lines")
_JSONL_SUFFIXES = (".jsonl", ".ndjson")
_CSV_SUFFIXES = {".csv": ",", ".tsv": "\t"}
_DATASETS_SUFFIXES = {".json": "json", ".parquet": "parquet", ".arrow": "arrow"}
_HUB_NAME_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
log = logging.getLogger(__name__)


@dataclass
class Tally:
    """Counts of what was read, dropped (by reason) and repaired (by kind)."""

    read: int = 0
    dropped: Counter = field(default_factory=Counter)
    repaired: Counter = field(default_factory=Counter)


@dataclass(frozen=True)
class CleanOptions:
    min_chars: int = 1
    max_chars: int = 2000
    normalize: str | None = "NFKC"
    dedupe: bool = False


# ----------------------------------------------------------------------------- lines


def _open_binary(path: str) -> IO[bytes]:
    with open(path, "rb") as f:
        magic = f.read(2)
    # Detect gzip by content: ".txt" files are sometimes compressed and vice versa.
    return gzip.open(path, "rb") if magic == _GZIP_MAGIC else open(path, "rb")


def _decode(raw: bytes, tally: Tally) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        tally.repaired["invalid_utf8"] += 1
        text = raw.decode("utf-8", errors="replace")
    if "\x00" in text:
        tally.repaired["nul_bytes"] += 1
        text = text.replace("\x00", "")
    return text


def _discard_rest_of_line(f: IO[bytes], chunk: int) -> None:
    while (part := f.readline(chunk)) and not part.endswith(b"\n"):
        pass


def iter_lines(path: str, tally: Tally, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> Iterator[str]:
    """Decoded lines (with their line endings) of a plain or gzipped file, bounded in memory.

    Lines longer than ``max_line_bytes`` are dropped (counted as ``oversized_line``) without
    ever being held in memory whole; a truncated gzip stream ends the file (counted).
    """
    with _open_binary(path) as f:
        try:
            while raw := f.readline(max_line_bytes + 1):
                if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
                    tally.dropped["oversized_line"] += 1
                    _discard_rest_of_line(f, max_line_bytes)
                    continue
                yield _decode(raw, tally)
        except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
            tally.dropped["truncated_gzip"] += 1
            log.warning("%s: compressed stream is damaged (%s); kept the lines before it", path, exc)


# ----------------------------------------------------------------------------- formats


def _texts_from_lines(path: str, tally: Tally, max_line_bytes: int) -> Iterator[str | None]:
    for line in iter_lines(path, tally, max_line_bytes):
        tally.read += 1
        yield line


def _texts_from_jsonl(path: str, field_name: str, tally: Tally, max_line_bytes: int) -> Iterator[str | None]:
    for line in iter_lines(path, tally, max_line_bytes):
        if not line.strip():
            continue
        tally.read += 1
        try:
            record = json.loads(line)
        except ValueError:
            tally.dropped["bad_json"] += 1
            continue
        yield _field_text(record, field_name, tally)


def _field_text(record: Any, field_name: str, tally: Tally) -> str | None:
    if not isinstance(record, dict) or field_name not in record:
        tally.dropped["missing_field"] += 1
        return None
    value = record[field_name]
    if not isinstance(value, str):
        tally.dropped["not_text"] += 1
        return None
    return value


def _csv_column_index(header: list[str], column: str, path: str) -> int:
    if column not in header:
        raise ValueError(
            f"{path}: column {column!r} not in header {header[:20]}; "
            "pass --column NAME, or a 0-based index for files without a header"
        )
    return header.index(column)


def _texts_from_csv(
    path: str, delimiter: str, column: str | int, tally: Tally, max_line_bytes: int
) -> Iterator[str | None]:
    # An integer column means positional access in a header-less file (like STS-B's TSV).
    rows = csv.reader(iter_lines(path, tally, max_line_bytes), delimiter=delimiter)
    index = column if isinstance(column, int) else None
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except csv.Error as exc:
            # csv refuses fields above its size limit (128 KiB): far beyond any max_chars.
            tally.read += 1
            tally.dropped["too_long" if "field larger" in str(exc) else "bad_csv_row"] += 1
            continue
        if index is None:
            index = _csv_column_index(row, str(column), path)
            continue
        tally.read += 1
        if index >= len(row):
            tally.dropped["missing_field"] += 1
            yield None
        else:
            yield row[index]


def _texts_from_datasets(source: str, field_name: str, tally: Tally, builder: str | None) -> Iterator[str | None]:
    import datasets  # heavy import: only when a source needs it

    try:
        if builder is not None:
            ds = datasets.load_dataset(builder, data_files=source, split="train", streaming=True)
        else:
            ds = datasets.load_dataset(source, split="train", streaming=True)
    except Exception as exc:  # datasets raises many types (hub, network, format)
        raise ValueError(
            f"cannot open {source!r} with datasets.load_dataset ({type(exc).__name__}: {exc}); "
            "check the path or Hub name"
        ) from exc
    for record in ds:
        tally.read += 1
        yield _field_text(record, field_name, tally)


def _format_suffix(path: str) -> str:
    name = path.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    return os.path.splitext(name)[1]


def looks_like_hub_name(source: str) -> bool:
    return (
        not os.path.exists(source)
        and _format_suffix(source) == ""
        and not source.startswith((".", "/", "~"))
        and _HUB_NAME_RE.match(source) is not None
    )


def check_source(source: str) -> None:
    """Raise FileNotFoundError with a fix when ``source`` is neither a path nor a Hub name."""
    if os.path.exists(source) or looks_like_hub_name(source):
        return
    raise FileNotFoundError(f"input not found: {source} (check the path; Hub datasets are given as 'owner/name')")


def iter_raw_texts(
    source: str,
    tally: Tally,
    *,
    text_field: str = "text",
    column: str | int | None = None,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
) -> Iterator[str | None]:
    """Raw texts of one source, picked by extension; None marks a record without text."""
    check_source(source)
    field_name = text_field if column is None else column
    if os.path.isdir(source) or looks_like_hub_name(source):
        return _texts_from_datasets(source, str(field_name), tally, builder=None)
    suffix = _format_suffix(source)
    if suffix in _JSONL_SUFFIXES:
        return _texts_from_jsonl(source, str(field_name), tally, max_line_bytes)
    if suffix in _CSV_SUFFIXES:
        return _texts_from_csv(source, _CSV_SUFFIXES[suffix], field_name, tally, max_line_bytes)
    if suffix in _DATASETS_SUFFIXES:
        return _texts_from_datasets(source, str(field_name), tally, builder=_DATASETS_SUFFIXES[suffix])
    # Anything else (.txt, no extension, unknown) is one text per line.
    return _texts_from_lines(source, tally, max_line_bytes)


# ----------------------------------------------------------------------------- cleaning


class Cleaner:
    """Strip, normalize, length-filter and optionally exact-dedupe texts, tallying drops."""

    def __init__(self, options: CleanOptions, tally: Tally) -> None:
        self.options = options
        self.tally = tally
        # 16-byte digests keep exact dedupe at ~100 bytes per unique text.
        self._seen: set[bytes] = set()

    def __call__(self, raw: str | None) -> str | None:
        if raw is None:
            return None
        text = raw.strip()
        if text and "\x00" in text:
            self.tally.repaired["nul_bytes"] += 1
            text = text.replace("\x00", "").strip()
        if text and self.options.normalize:
            text = unicodedata.normalize(self.options.normalize, text).strip()
        return self._filter(text)

    def _filter(self, text: str) -> str | None:
        reason = None
        if not text:
            reason = "empty"
        elif len(text) < self.options.min_chars:
            reason = "too_short"
        elif len(text) > self.options.max_chars:
            reason = "too_long"
        elif self.options.dedupe and self._is_duplicate(text):
            reason = "duplicate"
        if reason:
            self.tally.dropped[reason] += 1
            return None
        return text

    def _is_duplicate(self, text: str) -> bool:
        digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
        if digest in self._seen:
            return True
        self._seen.add(digest)
        return False
