"""Shard sources beyond a local folder: brace patterns, URL lists, ``pipe:`` commands, object stores.

A source (``train_shards``) is one of

- a local folder holding ``manifest.json`` (handled by manifest.py, as before);
- a brace pattern of paths or URLs, ``/data/shard-{000000..000099}.tar`` or
  ``https://host/c4/shard-{0000..0999}.tar.gz`` (expanded by webdataset's ``expand_urls``:
  braces, ``::``-separated lists);
- ``pipe:COMMAND`` whose standard output is the shard (``pipe:cat /x/shard-000001.tar``,
  ``pipe:aws s3 cp s3://b/shard-000001.tar -``), braces allowed inside the command;
- ``s3://``, ``gs://``, ``hf://``, ``http(s)://`` URLs, opened with webdataset's ``gopen``
  (curl for HTTP, ``gsutil cat`` for gs, the Hub resolver for hf); ``s3://`` has no gopen
  handler and is mapped to ``pipe:aws s3 cp URL -`` as webdataset's documentation does;
- a text file listing one path or URL per line (blank lines and ``#`` comments ignored).

Counts come from a manifest: ``train_manifest=FILE``, else ``manifest.json`` or
``sizes.json`` (open_clip's ``{"shard-000000.tar": N}``) beside the first shard at the same
base URL. Shards are matched to manifest entries by file name.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Sequence
from typing import Any, BinaryIO
from urllib.parse import urlparse

from .base import ShardError, ShardInfo

_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_SHARD_WORD_RE = re.compile(r"\S+\.(?:tar|tgz|tar\.gz)(?=\s|$|['\"])")
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
MANIFEST_NAMES = ("manifest.json", "sizes.json")

# curl's exit codes that say what went wrong (gopen reads http(s) through curl -f -s -L).
_CURL_EXITS = {
    6: "host not found",
    7: "could not connect",
    18: "transfer ended early (connection dropped mid-file)",
    22: "HTTP error status (404 not found, 403 forbidden, 5xx ...)",
    28: "timed out",
    52: "server sent nothing",
    56: "connection reset while receiving",
}


def is_remote(spec: str) -> bool:
    """A URL (``scheme://``) or a ``pipe:`` command, i.e. not a plain local path."""
    return spec.startswith("pipe:") or bool(_SCHEME_RE.match(spec))


def is_url_source(spec: Any) -> bool:
    """True for sources this module resolves: anything but a local folder (and mixtures)."""
    return isinstance(spec, str) and not os.path.isdir(spec)


def expand_source(spec: str) -> list[str]:
    """The shard URLs / paths of a source, in order; ShardError when there are none."""
    if not is_remote(spec) and os.path.isfile(spec) and not spec.endswith(SHARD_SUFFIXES):
        base = os.path.dirname(os.path.abspath(spec))
        with open(spec, encoding="utf-8") as f:
            lines = [ln.strip() for ln in f]
        urls = [ln if is_remote(ln) or os.path.isabs(ln) else os.path.join(base, ln)
                for ln in lines if ln and not ln.startswith("#")]
    else:
        from webdataset.shardlists import expand_urls

        urls = [u for u in expand_urls(spec) if u]
    if not urls:
        raise ShardError(f"train_shards={spec} names no shards")
    return urls


def map_url(url: str) -> str:
    """What gopen is asked to open: ``s3://`` goes through the AWS CLI, the rest as given."""
    if url.startswith("s3://"):
        return f"pipe:aws s3 cp {url} -"
    return url


def shard_word(url: str) -> str:
    """The part of a shard URL that names the file: the URL itself, or for ``pipe:`` the last
    word of the command ending in .tar / .tar.gz / .tgz."""
    if not url.startswith("pipe:"):
        return url
    words = _SHARD_WORD_RE.findall(url[5:])
    if not words:
        raise ShardError(
            f"cannot tell which shard {url!r} reads (no word ending in .tar/.tar.gz/.tgz); "
            "list the counts in a manifest and pass train_manifest=FILE"
        )
    return words[-1].strip("'\"")


def shard_basename(url: str) -> str:
    word = shard_word(url)
    path = urlparse(word).path if _SCHEME_RE.match(word) else word
    return os.path.basename(path)


def sibling(url: str, name: str) -> str:
    """The URL of ``name`` in the same folder as the shard ``url`` (inside a pipe: command too)."""
    word = shard_word(url)
    cut = word.rfind("/")
    new_word = (word[: cut + 1] if cut >= 0 else "") + name
    if url.startswith("pipe:"):
        head, sep, tail = url.rpartition(word)
        return head + new_word + tail
    return new_word


class _CheckedStream:
    """A byte stream from gopen that turns every failure into a ShardError naming the URL.

    gopen returns a Pipe (curl, gsutil, aws, a pipe: command) whose non-zero exit is only
    visible through its process; at the end of the data the exit status is checked, so a
    download that fails halfway is never mistaken for the end of a shorter file.
    """

    def __init__(self, url: str, raw: Any) -> None:
        self.url = url
        self._raw = raw
        self._checked = False

    def _failure(self, detail: str) -> ShardError:
        return ShardError(f"reading {self.url} failed: {detail}")

    def _exit_detail(self) -> str | None:
        proc = getattr(self._raw, "proc", None)
        if proc is None:
            return None
        try:
            status = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            return "the reading command did not exit after its output ended"
        if status in (0, 141):  # 141: SIGPIPE after we stopped reading
            return None
        args = proc.args if isinstance(proc.args, str) else " ".join(map(str, proc.args))
        program = os.path.basename(args.split()[0]) if args.split() else "command"
        meaning = _CURL_EXITS.get(status, "") if program == "curl" else ""
        return f"{program} exited {status}" + (f": {meaning}" if meaning else "")

    def read(self, n: int = -1) -> bytes:
        try:
            data = self._raw.stream.read(n) if hasattr(self._raw, "stream") else self._raw.read(n)
        except OSError as exc:
            raise self._failure(self._exit_detail() or str(exc)) from None
        if not data and n != 0 and not self._checked:
            self._checked = True
            detail = self._exit_detail()
            if detail:
                raise self._failure(detail)
        return data

    def close(self) -> None:
        proc = getattr(self._raw, "proc", None)
        stream = getattr(self._raw, "stream", self._raw)
        try:
            stream.close()
        except OSError:
            pass
        if proc is not None and proc.poll() is None:
            proc.kill()  # we stopped early (a reader leaving a shard): do not wait for the download
            proc.wait()


def open_url(url: str) -> BinaryIO:
    """Open a shard or manifest for reading, forward only. Local paths open as files."""
    if not is_remote(url):
        return open(url, "rb")
    from webdataset.gopen import gopen

    try:
        raw = gopen(map_url(url), "rb")
    except (OSError, ValueError) as exc:
        raise ShardError(f"cannot open {url}: {exc}") from None
    return _CheckedStream(url, raw)  # type: ignore[return-value]


def read_small(url: str) -> tuple[bytes | None, str]:
    """The whole content of a small file (a manifest), or None and why it could not be read."""
    try:
        f = open_url(url)
    except FileNotFoundError:
        return None, "no such file"
    except ShardError as exc:
        return None, str(exc)
    try:
        chunks = []
        while chunk := f.read(1 << 20):
            chunks.append(chunk)
        return b"".join(chunks), ""
    except ShardError as exc:  # a 404 reads as a failed download
        return None, str(exc).replace(f"reading {url} failed: ", "")
    finally:
        f.close()


def _entries_of(payload: Any, where: str) -> dict[str, dict[str, Any]]:
    """Manifest entries by file name, from our manifest.json or open_clip's sizes.json."""
    if isinstance(payload, dict) and isinstance(payload.get("shards"), list):
        out = {}
        for e in payload["shards"]:
            if not isinstance(e, dict) or not isinstance(e.get("name"), str) or not isinstance(e.get("count"), int):
                raise ShardError(f"malformed shard entry {e!r} in {where}")
            out[os.path.basename(e["name"])] = e
        return out
    if isinstance(payload, dict) and payload and all(isinstance(v, int) for v in payload.values()):
        return {os.path.basename(k): {"name": k, "count": v} for k, v in payload.items()}
    raise ShardError(f"{where} is neither a manifest.json (with 'shards') nor a sizes.json ({{name: count}})")


def load_remote_manifest(urls: Sequence[str], manifest: str | None = None) -> tuple[dict[str, Any], str]:
    """The parsed manifest for ``urls`` and where it came from."""
    tried = [manifest] if manifest else [sibling(urls[0], name) for name in MANIFEST_NAMES]
    reasons = []
    for where in tried:
        data, why = read_small(where)
        if data is None:
            reasons.append(f"{where} ({why})")
            continue
        try:
            return json.loads(data), where
        except ValueError:
            raise ShardError(f"unreadable manifest {where}: not JSON") from None
    raise ShardError(
        f"no sample counts for {urls[0]}: tried {' and '.join(reasons)}. Fix: write one with "
        "`hncse-dist shards --index PATTERN --manifest-out FILE` and set train_manifest=FILE"
    )


def remote_infos(spec: str, manifest: str | None = None) -> tuple[list[ShardInfo], str | None]:
    """ShardInfo per shard of a source (in the source's order) and the manifest's text_key."""
    urls = expand_source(spec)
    payload, where = load_remote_manifest(urls, manifest)
    entries = _entries_of(payload, where)
    infos, missing = [], []
    for url in urls:
        entry = entries.get(shard_basename(url))
        if entry is None:
            missing.append(url)
            continue
        infos.append(ShardInfo(path=url, count=entry["count"], sha256=entry.get("sha256"), size=entry.get("bytes")))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ShardError(
            f"{missing[0]}{more} not listed in {where}. Fix: re-index with "
            "`hncse-dist shards --index PATTERN --manifest-out FILE` and set train_manifest=FILE"
        )
    text_key = payload.get("text_key") if isinstance(payload, dict) and "shards" in payload else None
    return infos, text_key


def with_retries(what: str, attempt, retries: int, delay: float = 1.0):
    """``attempt()`` up to ``retries`` more times after a ShardError, doubling the wait."""
    for i in range(retries + 1):
        try:
            return attempt()
        except ShardError as exc:
            if i == retries:
                suffix = f" (after {retries} retries)" if retries else ""
                raise ShardError(f"{exc}{suffix}") from None
            import logging

            logging.getLogger(__name__).warning("%s: %s; retry %d of %d", what, exc, i + 1, retries)
            time.sleep(delay * 2**i)
    raise AssertionError("unreachable")
