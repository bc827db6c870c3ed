"""Transfer evaluation: loaders on the real files, the classifier protocol, end to end, errors."""

from __future__ import annotations


import numpy as np
import pytest

from hncse_dist.eval import eval_main
from hncse_dist.eval.embed import EmbeddingTable
from hncse_dist.eval.transfer import (
    TRANSFER_TASKS,
    ClassifierConfig,
    Split,
    TransferTask,
    cv_protocol,
    dev_protocol,
    evaluate_transfer,
    load_transfer_task,
    pair_features,
    score_transfer_task,
    train_test_protocol,
    transfer_counts,
)

from tests.datadir import data_dir, eval_tiny_bert, restore_torch_threads  # noqa: F401  (fixtures)
from tests.fixtures import HashEncoder

EXPECTED_COUNTS = {
    "MR": {"all": 10662},
    "CR": {"all": 3775},
    "SUBJ": {"all": 10000},
    "MPQA": {"all": 10606},
    "SST2": {"train": 67349, "dev": 872, "test": 1821},
    "TREC": {"train": 5452, "test": 500},
    "MRPC": {"train": 4076, "test": 1725},
}
FAST = ClassifierConfig(c_grid=(0.1, 1.0), folds=5, inner_folds=3)


# ---------------------------------------------------------------- loaders


def test_counts_on_real_files(data_dir):
    assert transfer_counts(data_dir) == EXPECTED_COUNTS


def test_empty_lines_kept_like_senteval(data_dir):
    cr = load_transfer_task(data_dir, "CR").splits["all"]
    mpqa = load_transfer_task(data_dir, "MPQA").splits["all"]
    assert sum(s == "" for s in cr.sent1) == 4
    assert sum(s == "" for s in mpqa.sent1) == 3
    assert (cr.labels == 1).sum() == 2407 and (mpqa.labels == 1).sum() == 3312


def test_trec_latin1_and_coarse_labels(data_dir):
    trec = load_transfer_task(data_dir, "TREC")
    assert sorted(set(trec.splits["train"].labels)) == list(range(6))
    assert trec.splits["train"].sent1[0] == "How did serfdom develop in and then leave Russia ?"
    assert any(not s.isascii() for s in trec.splits["train"].sent1)  # decoded, not dropped


def test_mrpc_bom_and_header(data_dir):
    train = load_transfer_task(data_dir, "MRPC").splits["train"]
    assert train.sent1[0].startswith("Amrozi accused his brother")
    assert set(train.labels) == {0, 1}
    assert len(train.sent2) == len(train.sent1) == 4076


def test_sst2_labels(data_dir):
    sst = load_transfer_task(data_dir, "SST2")
    assert sst.splits["dev"].sent1[0] == "it 's a charming and often affecting journey ."
    assert set(sst.splits["test"].labels) == {0, 1}


# ---------------------------------------------------------------- classifier protocol


def _blobs(n: int, seed: int, n_classes: int = 2, dim: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Well separated Gaussian blobs: a linear classifier gets every point right."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % n_classes
    centers = 10.0 * np.eye(n_classes, dim)
    return centers[y] + rng.normal(0, 0.5, size=(n, dim)), y


def test_cv_protocol_separable_is_perfect():
    x, y = _blobs(200, seed=0)
    result = cv_protocol(x, y, FAST)
    assert result["acc"] == pytest.approx(100.0)
    assert len(result["fold_acc"]) == FAST.folds and set(result["C"]) <= set(FAST.c_grid)


def test_dev_protocol_accuracy_counts_flipped_test_labels():
    train, dev, test = _blobs(200, 1), _blobs(60, 2), _blobs(100, 3)
    flipped = test[1].copy()
    flipped[:7] = 1 - flipped[:7]  # the learnt boundary still predicts the true class
    result = dev_protocol(train, dev, (test[0], flipped), FAST)
    assert result["acc"] == pytest.approx(93.0)
    assert result["dev_acc"] == pytest.approx(100.0)


def test_train_test_protocol_multiclass_and_f1():
    train = _blobs(300, 4, n_classes=3)
    test = _blobs(90, 5, n_classes=3)
    assert train_test_protocol(train, test, FAST)["acc"] == pytest.approx(100.0)

    train2, test2 = _blobs(200, 6), _blobs(100, 7)
    labels = test2[1].copy()
    labels[np.flatnonzero(labels == 0)[:10]] = 1  # 10 false positives against the new labels
    result = train_test_protocol(train2, (test2[0], labels), FAST, f1=True)
    tp, fp, fn = 50, 0, 10  # predictions = true blobs: 50 ones; labels now have 60 ones
    assert result["acc"] == pytest.approx(90.0)
    assert result["f1"] == pytest.approx(100 * 2 * tp / (2 * tp + fp + fn))


def test_pair_features_layout():
    u, v = np.array([[1.0, -2.0]]), np.array([[3.0, 4.0]])
    np.testing.assert_allclose(pair_features(u, v), [[1, -2, 3, 4, 2, 6, 3, -8]])


def test_pair_task_through_embedding_table():
    # Label 1 when both sentences map to the same vector: |u - v| separates the classes.
    rng = np.random.default_rng(8)
    vecs = rng.normal(size=(40, 6))
    table = EmbeddingTable([f"s{i}" for i in range(40)], vecs)

    def split(pairs):
        return Split(tuple(f"s{a}" for a, _ in pairs), np.array([int(a == b) for a, b in pairs]),
                     tuple(f"s{b}" for _, b in pairs))

    same = [(i, i) for i in range(40)]
    diff = [(i, (i + 1 + i % 7) % 40) for i in range(40)]
    task = TransferTask("MRPC", {"train": split(same[:30] + diff[:30]), "test": split(same[30:] + diff[30:])})
    result = score_transfer_task(task, table, FAST)
    assert result["acc"] == pytest.approx(100.0) and result["f1"] == pytest.approx(100.0)


# ---------------------------------------------------------------- end to end


def test_evaluate_transfer_small_tasks_single_encode(data_dir):
    encoder = HashEncoder()
    tasks = ("CR", "TREC", "MRPC")
    results = evaluate_transfer(encoder, data_dir, tasks=tasks, config=FAST)
    assert len(encoder.calls) == 1
    assert list(results) == list(tasks) + ["avg", "MRPC_F1", "details"]
    assert results["avg"] == pytest.approx(np.mean([results[t] for t in tasks]))
    # Hashed bag of words is a weak but real signal: above the majority-class rate.
    assert results["CR"] > 2407 / 3775 * 100 and results["TREC"] > 30.0
    assert 0.0 < results["MRPC_F1"] <= 100.0


def test_cli_all_transfer_tasks_with_tiny_bert(eval_tiny_bert, data_dir, tmp_path,
                                               restore_torch_threads):
    import json

    out = tmp_path / "transfer.json"
    code = eval_main(["--model", str(eval_tiny_bert), "--data-dir", str(data_dir), "--tasks", "transfer",
                      "--pooler", "avg", "--output", str(out), "--no-progress", "--threads", "1"])
    assert code == 0
    results = json.loads(out.read_text())["transfer"]
    assert list(results) == list(TRANSFER_TASKS) + ["avg", "MRPC_F1", "details"]
    assert all(0.0 <= results[t] <= 100.0 for t in TRANSFER_TASKS)
    assert results["avg"] == pytest.approx(np.mean([results[t] for t in TRANSFER_TASKS]))
    assert results["details"]["SST2"]["n_test"] == 1821


def test_cli_missing_transfer_file(tmp_path, capsys):
    (tmp_path / "transfer" / "MR").mkdir(parents=True)
    (tmp_path / "transfer" / "MR" / "rt-polarity.pos").write_text("good .\n")
    code = eval_main(["--model", "unused", "--data-dir", str(tmp_path), "--tasks", "MR"])
    err = capsys.readouterr().err
    assert code != 0
    assert str(tmp_path / "transfer" / "MR" / "rt-polarity.neg") in err and "expected layout" in err
