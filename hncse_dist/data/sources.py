"""Input readers (text, JSONL, CSV/TSV, anything `datasets` opens) and text cleaning.

Every reader yields raw texts and records problems in a Tally instead of raising, so one
bad line never stops a multi-hour conversion; the tally becomes the manifest's report.
"""

from __future__ import annotations

import codecs
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


def repair_kind(encoding: str) -> str:
    """Tally key of lines that did not decode: ``invalid_utf8`` for UTF-8, ``invalid_<codec>`` else."""
    return "invalid_" + codecs.lookup(encoding).name.replace("-", "_").replace("utf_8", "utf8")


def _decode(raw: bytes, tally: Tally, encoding: str = "utf-8") -> str:
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError:
        tally.repaired[repair_kind(encoding)] += 1
        text = raw.decode(encoding, errors="replace")
    if "\x00" in text:
        tally.repaired["nul_bytes"] += 1
        text = text.replace("\x00", "")
    return text


def _discard_rest_of_line(f: IO[bytes], chunk: int) -> None:
    while (part := f.readline(chunk)) and not part.endswith(b"\n"):
        pass


def iter_lines(
    path: str, tally: Tally, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES, encoding: str = "utf-8"
) -> Iterator[str]:
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
                yield _decode(raw, tally, encoding)
        except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
            tally.dropped["truncated_gzip"] += 1
            log.warning("%s: compressed stream is damaged (%s); kept the lines before it", path, exc)


# ----------------------------------------------------------------------------- formats


def _texts_from_lines(path: str, tally: Tally, max_line_bytes: int, encoding: str) -> Iterator[str | None]:
    for line in iter_lines(path, tally, max_line_bytes, encoding):
        tally.read += 1
        yield line


def _texts_from_jsonl(
    path: str, field_name: str, tally: Tally, max_line_bytes: int, encoding: str
) -> Iterator[str | None]:
    for line in iter_lines(path, tally, max_line_bytes, encoding):
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
    path: str, delimiter: str, column: str | int, tally: Tally, max_line_bytes: int, encoding: str
) -> Iterator[str | None]:
    # An integer column means positional access in a header-less file (like STS-B's TSV).
    rows = csv.reader(iter_lines(path, tally, max_line_bytes, encoding), delimiter=delimiter)
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
    encoding: str = "utf-8",
) -> Iterator[str | None]:
    """Raw texts of one source, picked by extension; None marks a record without text.
    ``encoding`` applies to the line-based formats (text, JSONL, CSV/TSV)."""
    check_source(source)
    field_name = text_field if column is None else column
    if os.path.isdir(source) or looks_like_hub_name(source):
        return _texts_from_datasets(source, str(field_name), tally, builder=None)
    suffix = _format_suffix(source)
    if suffix in _JSONL_SUFFIXES:
        return _texts_from_jsonl(source, str(field_name), tally, max_line_bytes, encoding)
    if suffix in _CSV_SUFFIXES:
        return _texts_from_csv(source, _CSV_SUFFIXES[suffix], field_name, tally, max_line_bytes, encoding)
    if suffix in _DATASETS_SUFFIXES:
        return _texts_from_datasets(source, str(field_name), tally, builder=_DATASETS_SUFFIXES[suffix])
    # Anything else (.txt, no extension, unknown) is one text per line.
    return _texts_from_lines(source, tally, max_line_bytes, encoding)


def reads_as_lines(source: str) -> bool:
    """Whether ``source`` is read line by line (text, JSONL, CSV/TSV) rather than by ``datasets``."""
    if os.path.isdir(source) or looks_like_hub_name(source):
        return False
    return _format_suffix(source) not in _DATASETS_SUFFIXES


def archive_kind(path: str) -> str | None:
    """"tar" or "zip" when the file's bytes are such an archive (gzip-compressed tar included)."""
    with open(path, "rb") as f:
        head = f.read(512 + 8)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if head[:2] == _GZIP_MAGIC:
        try:
            with gzip.open(path, "rb") as f:
                head = f.read(512 + 8)
        except (OSError, EOFError, zlib.error):
            return None
    return "tar" if head[257:262] == b"ustar" else None


def check_text_source(source: str) -> None:
    """Raise ValueError when a line-read input is an archive: its headers would become 'sentences'."""
    if not (os.path.isfile(source) and reads_as_lines(source)):
        return
    kind = archive_kind(source)
    if kind == "tar":
        raise ValueError(
            f"{source} is a tar archive, not text. Fix: if it holds WebDataset shards, put them in a folder, "
            "run `hncse-dist shards --index DIR` and train with train_shards=DIR; otherwise unpack it and "
            "pass the text files as --input"
        )
    if kind == "zip":
        raise ValueError(f"{source} is a zip archive, not text. Fix: unpack it and pass the text files as --input")


# ----------------------------------------------------------------------------- repair limit

MAX_REPAIRED_FRACTION = 0.01  # more lines needing repair than this: the input is not what it claims
_REPAIR_CHECK_AFTER = 1000  # lines before the limit is first checked (a verdict within seconds)


class TooManyRepairs(ValueError):
    """A source where too many lines did not decode or held NUL bytes (binary, or another encoding)."""

    CLI_FIX = (
        "pass --encoding latin-1 (or the file's real encoding) if it is text in another encoding, "
        "or --allow-repairs to keep the repaired lines"
    )

    def __init__(self, source: str, lines: int, undecodable: int, nul: int, encoding: str, fix: str = CLI_FIX):
        self.source, self.lines, self.undecodable, self.nul, self.encoding = source, lines, undecodable, nul, encoding
        self.fix = fix
        label = "UTF-8" if repair_kind(encoding) == "invalid_utf8" else encoding
        super().__init__(
            f"{source} does not look like text: {undecodable} of {lines} lines had invalid {label}, {nul} had "
            f"NUL bytes (more than {MAX_REPAIRED_FRACTION:.0%} needed repair; nothing was written). Fix: {fix}"
        )

    def with_fix(self, fix: str) -> TooManyRepairs:
        return TooManyRepairs(self.source, self.lines, self.undecodable, self.nul, self.encoding, fix)


class RepairLimit:
    """Watches one source's tally and raises TooManyRepairs when repairs pass the limit."""

    def __init__(self, source: str, tally: Tally, encoding: str, allow: bool) -> None:
        self.source, self.tally, self.encoding, self.allow = source, tally, encoding, allow
        self._kind = repair_kind(encoding)
        self._start = self._counts()
        self._next_check = self._start[0] + _REPAIR_CHECK_AFTER  # in tally.read: cheap per record

    def _counts(self) -> tuple[int, int, int]:
        return self.tally.read, self.tally.repaired[self._kind], self.tally.repaired["nul_bytes"]

    def check(self, final: bool = False) -> None:
        """Called after every record (cheap) and with ``final`` at the source's end."""
        if self.allow or (not final and self.tally.read < self._next_check):
            return
        self._next_check = self.tally.read + _REPAIR_CHECK_AFTER
        lines, undecodable, nul = (now - start for now, start in zip(self._counts(), self._start))
        if lines and undecodable + nul > MAX_REPAIRED_FRACTION * lines:
            raise TooManyRepairs(self.source, lines, undecodable, nul, self.encoding)


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
