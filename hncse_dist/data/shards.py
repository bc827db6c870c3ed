"""Convert text corpora into WebDataset tar shards with a manifest.

Layout of an output directory::

    shard-000000.tar ...   samples {"__key__": "000000000042", "txt": text}
    manifest.json          per-shard count/sha256/bytes, total, sources, options, report

Shards are deterministic (same inputs and options give the same bytes), written under a
temporary name and renamed, and journaled one line per finished shard, so an interrupted
run restarted with the same arguments keeps every shard whose sha256 still matches.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import sys
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from typing import Any

from tqdm import tqdm

from .manifest import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    MANIFEST_VERSION,
    SHARD_NAME_RE,
    check_shard,
    read_json,
    shard_infos,
    shard_name,
    write_json_atomic,
)
from .sources import (
    DEFAULT_MAX_LINE_BYTES,
    Cleaner,
    CleanOptions,
    RepairLimit,
    Tally,
    TooManyRepairs,
    check_source,
    check_text_source,
    iter_raw_texts,
)
from .tario import ShardReader, sha256_file, write_text_tar

log = logging.getLogger(__name__)

JOURNAL_NAME = ".progress.jsonl"
_NORMAL_FORMS = ("NFC", "NFD", "NFKC", "NFKD")
_TMP_RE = re.compile(r"^(\.shard-\d{6}\.tar(\.gz)?|manifest\.json)\.tmp-\d+$")


# ----------------------------------------------------------------------------- helpers


def _describe_source(source: str) -> dict[str, Any]:
    if not os.path.exists(source):
        return {"hub": source}
    st = os.stat(source)
    described: dict[str, Any] = {"path": os.path.abspath(source), "mtime_ns": st.st_mtime_ns}
    if os.path.isfile(source):
        described["size"] = st.st_size
    return described


def _fingerprint(options: dict[str, Any], sources: list[dict[str, Any]]) -> str:
    blob = json.dumps({"options": options, "sources": sources}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _sample_key(index: int) -> str:
    # Zero-padded global index: unique across shards, sortable, no dots (WebDataset keys).
    return f"{index:012d}"


def _chunks(items: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _cleaned_texts(inputs: list[str], cleaner: Cleaner, options: dict[str, Any]) -> Iterator[str]:
    for source in inputs:
        raw_texts = iter_raw_texts(
            source,
            cleaner.tally,
            text_field=options["text_field"],
            column=options["column"],
            max_line_bytes=options["max_line_bytes"],
            encoding=options["encoding"],
        )
        limit = RepairLimit(source, cleaner.tally, options["encoding"], options["allow_repairs"])
        for raw in raw_texts:
            text = cleaner(raw)
            limit.check()
            if text is not None:
                yield text
        limit.check(final=True)


def _remove_stale_files(output_dir: str, keep: set[str]) -> None:
    """Delete shard files the manifest does not name (e.g. from a longer or uncompressed run)."""
    for name in os.listdir(output_dir):
        stale_shard = SHARD_NAME_RE.match(name) and name not in keep
        if stale_shard or _TMP_RE.match(name):
            os.unlink(os.path.join(output_dir, name))


def _manifest_is_current(output_dir: str, manifest: dict[str, Any] | None, fingerprint: str) -> bool:
    if not manifest or manifest.get("fingerprint") != fingerprint or not manifest.get("shards"):
        return False
    return all(check_shard(info, verify_sha=True) is None for info in shard_infos(output_dir, manifest))


# ----------------------------------------------------------------------------- journal


def _read_journal(output_dir: str, fingerprint: str) -> dict[str, dict[str, Any]]:
    """Shard entries recorded by an earlier run with identical inputs and options."""
    records: dict[str, dict[str, Any]] = {}
    try:
        with open(os.path.join(output_dir, JOURNAL_NAME), encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return records
    if not lines or _parse_json_line(lines[0]).get("fingerprint") != fingerprint:
        return records
    for line in lines[1:]:
        entry = _parse_json_line(line)  # a torn last line parses to {} and is ignored
        if "name" in entry:
            records[entry["name"]] = entry
    return records


def _parse_json_line(line: str) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _append_journal(path: str, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------- writer


def _keep_or_write_shard(
    output_dir: str, name: str, first_key: int, texts: list[str], previous: dict[str, Any] | None
) -> tuple[dict[str, Any], bool]:
    """The manifest entry for shard ``name`` and whether it was (re)written."""
    path = os.path.join(output_dir, name)
    if (
        previous is not None
        and previous.get("count") == len(texts)
        and os.path.isfile(path)
        and os.path.getsize(path) == previous.get("bytes")
        and sha256_file(path) == previous.get("sha256")
    ):
        return previous, False
    samples = ((_sample_key(first_key + i), text) for i, text in enumerate(texts))
    count, sha, size = write_text_tar(samples, path)
    return {"name": name, "count": count, "sha256": sha, "bytes": size}, True


def _validate_write_args(
    inputs: list[str], samples_per_shard: int, min_chars: int, max_chars: int, normalize: str | None, encoding: str
) -> None:
    if not inputs:
        raise ValueError("no input given: pass at least one --input PATH")
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if min_chars < 1 or max_chars < min_chars:
        raise ValueError(f"need 1 <= min_chars <= max_chars, got {min_chars} and {max_chars}")
    if normalize is not None and normalize not in _NORMAL_FORMS:
        raise ValueError(f"normalize must be one of {_NORMAL_FORMS} or None, got {normalize!r}")
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise ValueError(f"unknown encoding {encoding!r}: pass a Python codec name such as utf-8, latin-1, cp1252") from None
    for source in inputs:
        check_source(source)
        check_text_source(source)


def _empty_input_error(inputs: list[str], tally: Tally) -> ValueError:
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(tally.dropped.items())) or "none"
    return ValueError(
        f"no samples left from {', '.join(inputs)} (records read: {tally.read}; dropped: {reasons}). "
        "Fix: check the input format, --text-field/--column, or the --min-chars/--max-chars limits"
    )


def write_shards(
    inputs: list[str],
    output_dir: str,
    samples_per_shard: int = 10000,
    *,
    text_field: str = "text",
    column: str | int | None = None,
    min_chars: int = 1,
    max_chars: int = 2000,
    dedupe: bool = False,
    normalize: str | None = "NFKC",
    progress: bool = True,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    gzip: bool = False,
    encoding: str = "utf-8",
    allow_repairs: bool = False,
) -> dict[str, Any]:
    """Clean ``inputs`` into ``output_dir/shard-%06d.tar`` (``.tar.gz`` with ``gzip``: a tar
    spends about 1 KiB of header and padding per short sentence, gzip removes most of it) plus
    ``manifest.json``; return the manifest.

    Inputs: one text per line (plain or gzip), JSONL (``text_field``), CSV/TSV (``column``: a
    header name, or a 0-based index for header-less files), .json/.parquet/.arrow files,
    dataset directories or Hub names via ``datasets``. Rerunning with the same arguments
    keeps finished shards whose sha256 matches and returns at once when all are current.

    Line-based inputs are decoded with ``encoding``; lines that do not decode are repaired
    (U+FFFD) and NUL bytes removed, but a source where more than 1% of the lines need that is
    refused (TooManyRepairs: binary data or another encoding) unless ``allow_repairs``.
    Archives (tar, zip) given as text are refused.
    """
    _validate_write_args(inputs, samples_per_shard, min_chars, max_chars, normalize, encoding)
    os.makedirs(output_dir, exist_ok=True)
    options = {
        "text_field": text_field, "column": column, "min_chars": min_chars, "max_chars": max_chars,
        "dedupe": dedupe, "normalize": normalize, "max_line_bytes": max_line_bytes,
        "samples_per_shard": samples_per_shard, "gzip": gzip,
        "encoding": encoding, "allow_repairs": allow_repairs,
    }
    sources = [_describe_source(s) for s in inputs]
    fingerprint = _fingerprint(options, sources)
    manifest_path = os.path.join(output_dir, MANIFEST_NAME)
    existing = read_json(manifest_path)
    if _manifest_is_current(output_dir, existing, fingerprint):
        log.info("%s is up to date (%d shards)", output_dir, len(existing["shards"]))
        return {**existing, "kept_from_previous_run": len(existing["shards"])}  # type: ignore[dict-item]

    previous, journal_path = _start_run(output_dir, fingerprint, existing)
    tally = Tally()
    cleaner = Cleaner(CleanOptions(min_chars, max_chars, normalize, dedupe), tally)
    shards, kept = _write_all_shards(inputs, output_dir, options, cleaner, previous, journal_path, progress)
    if not shards:
        os.unlink(journal_path)
        raise _empty_input_error(inputs, tally)

    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "fingerprint": fingerprint,
        "samples_per_shard": samples_per_shard,
        "total": sum(e["count"] for e in shards),
        "shards": shards,
        "sources": sources,
        "options": options,
        "read": tally.read,
        "dropped": dict(sorted(tally.dropped.items())),
        "repaired": dict(sorted(tally.repaired.items())),
        "kept_from_previous_run": kept,
    }
    write_json_atomic(manifest_path, manifest)
    os.unlink(journal_path)
    _remove_stale_files(output_dir, keep={e["name"] for e in shards})
    return manifest


def _start_run(
    output_dir: str, fingerprint: str, existing: dict[str, Any] | None
) -> tuple[dict[str, dict[str, Any]], str]:
    """Shard entries reusable from earlier runs, and a fresh journal for this one."""
    previous = _read_journal(output_dir, fingerprint)
    if existing and existing.get("fingerprint") == fingerprint:
        previous.update({e["name"]: e for e in existing.get("shards", [])})
    # From here on the old manifest may describe overwritten shards: readers must not trust it.
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(output_dir, MANIFEST_NAME))
    journal_path = os.path.join(output_dir, JOURNAL_NAME)
    with open(journal_path, "w", encoding="utf-8") as f:
        # Carry earlier entries over: they are verified when reached, and another crash
        # before then must not forget them.
        for record in [{"fingerprint": fingerprint}, *previous.values()]:
            f.write(json.dumps(record, sort_keys=True) + "\n")
    return previous, journal_path


def _write_all_shards(
    inputs: list[str],
    output_dir: str,
    options: dict[str, Any],
    cleaner: Cleaner,
    previous: dict[str, dict[str, Any]],
    journal_path: str,
    progress: bool,
) -> tuple[list[dict[str, Any]], int]:
    per_shard = options["samples_per_shard"]
    shards: list[dict[str, Any]] = []
    kept = 0
    texts = _cleaned_texts(inputs, cleaner, options)
    with tqdm(desc=f"shards -> {output_dir}", unit=" samples", disable=not progress, file=sys.stderr) as bar:
        for index, chunk in enumerate(_chunks(texts, per_shard)):
            name = shard_name(index, options["gzip"])
            entry, written = _keep_or_write_shard(output_dir, name, index * per_shard, chunk, previous.get(name))
            kept += not written
            shards.append(entry)
            _append_journal(journal_path, entry)
            bar.update(len(chunk))
            bar.set_postfix(shards=len(shards), dropped=sum(cleaner.tally.dropped.values()))
    return shards, kept


def index_shards(shard_dir: str, pattern: str = "*.tar*") -> dict[str, Any]:
    """Write a manifest for tar shards made elsewhere (e.g. webdataset.ShardWriter).

    Counts the samples of every matching file (sorted by name) and records its sha256, so
    ShardStream can read the directory. Raises ShardError naming an unreadable file.
    """
    import glob

    paths = sorted(glob.glob(os.path.join(shard_dir, pattern)))
    if not paths:
        raise FileNotFoundError(f"no files matching {pattern} in {shard_dir}")
    shards = []
    for path in paths:
        with ShardReader(path) as reader:
            count = sum(1 for _ in reader)
            sha, size = reader.finish()  # the digest of the bytes just read: no second pass
        shards.append({"name": os.path.basename(path), "count": count, "sha256": sha, "bytes": size})
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "total": sum(e["count"] for e in shards),
        "shards": shards,
        "sources": [{"indexed": os.path.abspath(shard_dir)}],
    }
    write_json_atomic(os.path.join(shard_dir, MANIFEST_NAME), manifest)
    return manifest


# ----------------------------------------------------------------------------- report / CLI


def format_report(manifest: dict[str, Any]) -> str:
    """Human-readable summary of a manifest: totals, drops by reason, repairs."""
    lines = [
        f"wrote {manifest['total']} samples in {len(manifest['shards'])} shards "
        f"({manifest.get('kept_from_previous_run', 0)} kept from a previous run)",
        f"records read: {manifest.get('read', '?')}",
    ]
    dropped = manifest.get("dropped") or {}
    lines.append(f"dropped: {sum(dropped.values())}" + ("" if dropped else " (nothing)"))
    lines += [f"  {reason:<16} {count}" for reason, count in dropped.items()]
    repaired = manifest.get("repaired") or {}
    if repaired:
        lines.append("repaired (kept):")
        lines += [f"  {kind:<16} {count}" for kind, count in repaired.items()]
    return "\n".join(lines)


def _column_arg(value: str) -> str | int:
    return int(value) if value.isdigit() else value


def build_shards_parser(prog: str = "hncse-dist shards") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Clean text corpora and write WebDataset tar shards plus manifest.json for training. "
            "Inputs: one sentence per line (.txt, optionally .gz), JSONL (--text-field), "
            "CSV/TSV (--column), .json/.parquet/.arrow files or Hub dataset names. "
            "Rerunning with the same arguments resumes and keeps finished shards."
        ),
        epilog="example: hncse-dist shards --input wiki.txt.gz --output data/wiki_shards --samples-per-shard 10000",
    )
    parser.add_argument("--input", nargs="+", metavar="PATH", help="input files, dataset dirs or Hub names")
    parser.add_argument("--output", metavar="DIR", help="output shard directory (created if missing)")
    parser.add_argument("--index", metavar="DIR_OR_PATTERN", default=None,
                        help="instead of converting text: write manifest.json for the .tar/.tar.gz shards already "
                             "in DIR (e.g. written by webdataset.ShardWriter), so train_shards=DIR reads them; also "
                             "a brace pattern, URL(s), pipe:COMMAND or a file listing shards (with --manifest-out)")
    parser.add_argument("--text-key", default=None, metavar="KEY",
                        help="with --index: the member holding the text, an extension (txt, text, caption) or "
                             "json:FIELD.PATH (json:text); recorded in the manifest as training's text_key")
    parser.add_argument("--manifest-out", default=None, metavar="FILE",
                        help="with --index: where to write the manifest (default: manifest.json in the shards' "
                             "folder; required for URLs)")
    parser.add_argument("--samples-per-shard", type=int, default=10000, metavar="N", help="samples per tar shard (default 10000)")
    parser.add_argument("--text-field", default="text", metavar="F", help="JSONL/dataset field holding the text (default: text)")
    parser.add_argument(
        "--column", type=_column_arg, default=None, metavar="C",
        help="CSV/TSV column: a header name, or a 0-based index for files without a header row",
    )
    parser.add_argument("--min-chars", type=int, default=1, metavar="N", help="drop texts shorter than N characters (default 1)")
    parser.add_argument("--max-chars", type=int, default=2000, metavar="N", help="drop texts longer than N characters (default 2000)")
    parser.add_argument("--dedupe", action="store_true", help="drop exact duplicates (after normalization); memory ~100 B per text")
    parser.add_argument("--no-normalize", action="store_true", help="skip Unicode NFKC normalization")
    parser.add_argument("--gzip", action="store_true",
                        help="write .tar.gz shards: several times smaller for sentence corpora (a plain tar "
                             "spends ~1 KiB per sentence on headers and padding); read transparently")
    parser.add_argument("--encoding", default="utf-8", metavar="CODEC",
                        help="text encoding of line-based inputs (default utf-8), e.g. latin-1, cp1252")
    parser.add_argument("--allow-repairs", action="store_true",
                        help="keep going when more than 1%% of a source's lines do not decode or hold NUL bytes "
                             "(they are repaired and counted); by default such input is refused as binary or "
                             "mis-encoded")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def shards_main(argv: list[str]) -> int:
    """Entry point of ``hncse-dist shards``; returns the process exit code."""
    parser = build_shards_parser()
    args = parser.parse_args(argv)
    if args.index is not None:
        from .index import index_main

        return index_main(args.index, args.text_key, args.manifest_out)
    if not args.input or not args.output:
        parser.error("--input and --output are required (or --index DIR)")
    try:
        manifest = write_shards(
            args.input,
            args.output,
            args.samples_per_shard,
            text_field=args.text_field,
            column=args.column,
            min_chars=args.min_chars,
            max_chars=args.max_chars,
            dedupe=args.dedupe,
            normalize=None if args.no_normalize else "NFKC",
            progress=not args.quiet,
            gzip=args.gzip,
            encoding=args.encoding,
            allow_repairs=args.allow_repairs,
        )
    except (FileNotFoundError, ValueError, IsADirectoryError, PermissionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_report(manifest))
    print(f"manifest: {os.path.join(args.output, MANIFEST_NAME)}")
    return 0


# ----------------------------------------------------------------------------- cache


def _cache_dir_for(text_path: str, cache_dir: str, samples_per_shard: int, decoding: str = "") -> str:
    st = os.stat(text_path)
    identity = f"{os.path.abspath(text_path)}|{st.st_size}|{st.st_mtime_ns}|{samples_per_shard}{decoding}"
    digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
    stem = re.sub(r"[^\w.-]", "_", os.path.basename(text_path)) or "corpus"
    return os.path.join(cache_dir, f"{stem}-{digest}")


def _cached_shards_usable(shard_dir: str) -> bool:
    manifest = read_json(os.path.join(shard_dir, MANIFEST_NAME))
    if not manifest or not isinstance(manifest.get("shards"), list):
        return False
    return all(check_shard(info) is None for info in shard_infos(shard_dir, manifest))


@contextlib.contextmanager
def _exclusive_lock(path: str) -> Iterator[None]:
    """flock on ``path``; degrades to no lock where the filesystem refuses (some NFS)."""
    import fcntl

    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as exc:
            log.warning("cannot lock %s (%s); relying on atomic rename only", path, exc)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(handle, fcntl.LOCK_UN)


CONFIG_REPAIR_FIX = (
    "set train_file_encoding=latin-1 (or the file's real encoding) if it is text in another encoding, "
    "or train_file_allow_repairs=true to keep the repaired lines"
)


def ensure_shards(
    text_path: str,
    cache_dir: str,
    samples_per_shard: int = 10000,
    *,
    encoding: str = "utf-8",
    allow_repairs: bool = False,
    report: bool = True,
) -> str:
    """Shard ``text_path`` once into ``cache_dir`` and return the shard directory.

    The cache entry is keyed by absolute path, size, mtime and shard size (and the decoding
    options when not the defaults). Safe under concurrent callers: a lock file serialises
    writers on one machine, and the shards are built in a private temporary directory renamed
    into place, so callers on other machines (where locks may not work) at worst duplicate
    work and never see a partial directory. When it writes shards it prints their report
    (samples, drops and repairs by reason) unless ``report`` is False; refused input raises
    TooManyRepairs naming the config keys that accept it.
    """
    decoding = "" if (encoding, allow_repairs) == ("utf-8", False) else f"|{encoding}|{allow_repairs}"
    target = _cache_dir_for(text_path, cache_dir, samples_per_shard, decoding)
    if _cached_shards_usable(target):
        return target
    os.makedirs(cache_dir, exist_ok=True)
    with _exclusive_lock(f"{target}.lock"):
        if _cached_shards_usable(target):
            return target
        tmp = f"{target}.tmp-{socket.gethostname()}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            manifest = write_shards([text_path], tmp, samples_per_shard, progress=sys.stderr.isatty(),
                                    encoding=encoding, allow_repairs=allow_repairs)
        except TooManyRepairs as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise exc.with_fix(CONFIG_REPAIR_FIX) from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _publish_dir(tmp, target)
    if report:
        print(f"train_file {text_path} -> {target}\n{format_report(manifest)}", flush=True)
    return target


def _publish_dir(tmp: str, target: str) -> None:
    if os.path.isdir(target) and not _cached_shards_usable(target):
        shutil.rmtree(target, ignore_errors=True)  # damaged leftover, we hold the lock
    try:
        os.rename(tmp, target)
    except OSError:
        # Another machine published first; its shards are identical to ours.
        shutil.rmtree(tmp, ignore_errors=True)
        if not _cached_shards_usable(target):
            raise
