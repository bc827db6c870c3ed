"""Where the evaluation data lives, for tests.

``$HNCSE_DATA_DIR`` or ``<repo>/../shared/data``. When the folder is missing the test is
skipped, except under ``CI=true`` where missing data is a failure.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data"


def find_data_dir() -> Path | None:
    path = Path(os.environ.get("HNCSE_DATA_DIR") or DEFAULT_DATA_DIR)
    return path if (path / "sts").is_dir() and (path / "transfer").is_dir() else None


def require_data_dir() -> Path:
    path = find_data_dir()
    if path is None:
        reason = (
            "evaluation data not found: set HNCSE_DATA_DIR to a folder with sts/ and transfer/ "
            f"(default {DEFAULT_DATA_DIR})"
        )
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return require_data_dir()
