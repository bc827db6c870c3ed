"""File helpers shared by the STS and transfer loaders (SentEval ``downstream`` layout)."""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR_ENV = "HNCSE_DATA_DIR"


class MissingDataError(FileNotFoundError):
    """A task file is absent; the message names the path and the expected layout."""


def require_file(path: Path, task: str, layout: str) -> Path:
    if not path.is_file():
        raise MissingDataError(f"{task}: missing {path} (expected layout: {layout})")
    return path


def read_lines(path: Path, encoding: str = "utf-8") -> list[str]:
    """Lines of a text file, the way SentEval counts them (``str.splitlines``).

    ``utf-8-sig`` drops the BOM some files (MRPC) start with; splitlines also removes the
    ``\\r`` of CRLF files (SICK test), so callers never see line-ending artefacts.
    """
    if encoding == "utf-8":
        encoding = "utf-8-sig"
    return Path(path).read_text(encoding=encoding).splitlines()


def normalize(text: str) -> str:
    """Collapse whitespace: SentEval splits sentences into tokens and evaluators re-join them."""
    return " ".join(text.split())


def default_data_dir() -> Path | None:
    """``$HNCSE_DATA_DIR`` when set, else None (callers decide how to fail)."""
    value = os.environ.get(DATA_DIR_ENV)
    return Path(value) if value else None
