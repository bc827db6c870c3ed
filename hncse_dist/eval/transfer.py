"""SentEval transfer tasks: a logistic-regression probe on frozen sentence embeddings.

Protocol (close to SentEval's, with scikit-learn in place of its PyTorch classifier):
  * Features are standardised (mean 0, variance 1) with statistics of the training part only,
    which lets lbfgs converge quickly and makes one C grid fit every encoder.
  * Classifier: L2-regularised ``LogisticRegression(solver="lbfgs")`` (multinomial for TREC);
    C is chosen from ``ClassifierConfig.c_grid`` (1e-4 ... 1, one per decade) by accuracy, ties
    going to the smaller C (stronger regularisation).
  * MR, CR, SUBJ, MPQA: stratified 10-fold CV; inside each outer fold C is chosen by an
    inner stratified k-fold CV on the training folds (SentEval: InnerKFoldClassifier).
  * SST2: C chosen on dev, classifier trained on train, accuracy on test (SplitClassifier).
  * TREC: C chosen by k-fold CV on train, refit on all of train, accuracy on test.
  * MRPC: same as TREC on pair features [u, v, |u - v|, u * v]; accuracy and F1 on test.
    (SentEval itself uses only [|u - v|, u * v] for MRPC.)
Differences from SentEval: a C grid in place of its weight-decay grid, a 5-fold inner CV
by default (SentEval: 10) to keep CPU runs short, and standardised features. Empty lines of
CR/MPQA are kept as empty sentences, as SentEval keeps them (counts 3775 and 10606).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from .data import normalize, read_lines, require_file
from .embed import EmbeddingTable, SupportsEncode

TRANSFER_TASKS = ("MR", "CR", "SUBJ", "MPQA", "SST2", "TREC", "MRPC")
# positive file, negative file (SentEval labels the first one 1)
BINARY_FILES = {
    "MR": ("rt-polarity.pos", "rt-polarity.neg"),
    "CR": ("custrev.pos", "custrev.neg"),
    "SUBJ": ("subj.objective", "subj.subjective"),
    "MPQA": ("mpqa.pos", "mpqa.neg"),
}
SST2_FILES = {"train": "sentiment-train", "dev": "sentiment-dev", "test": "sentiment-test"}
TREC_FILES = {"train": "train_5500.label", "test": "TREC_10.label"}
MRPC_FILES = {"train": "msr_paraphrase_train.txt", "test": "msr_paraphrase_test.txt"}
XY = tuple[np.ndarray, np.ndarray]  # features, labels
TRANSFER_LAYOUT = (
    "DATA_DIR/transfer/MR/rt-polarity.{pos,neg}, CR/custrev.{pos,neg}, "
    "SUBJ/subj.{objective,subjective}, MPQA/mpqa.{pos,neg}, SST2/sentiment-{train,dev,test}, "
    "TREC/{train_5500,TREC_10}.label, MRPC/msr_paraphrase_{train,test}.txt"
)


@dataclass(frozen=True)
class Split:
    """Labelled examples; ``sent2`` is set for sentence-pair tasks (MRPC)."""

    sent1: tuple[str, ...]
    labels: np.ndarray
    sent2: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class TransferTask:
    """``splits`` is {"all"} for CV tasks, {"train","dev","test"} or {"train","test"} otherwise."""

    name: str
    splits: dict[str, Split]

    def counts(self) -> dict[str, int]:
        return {split: len(data) for split, data in self.splits.items()}

    def sentences(self) -> Iterator[str]:
        for data in self.splits.values():
            yield from data.sent1
            yield from data.sent2 or ()


@dataclass(frozen=True)
class ClassifierConfig:
    c_grid: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
    folds: int = 10
    inner_folds: int = 5
    max_iter: int = 1000
    seed: int = 1111
    # BLAS/OpenMP threads per fit. Small lbfgs problems gain nothing from more, and torch's
    # idle thread pool in the same process makes multi-threaded fits up to 20x slower.
    threads: int | None = 1


# ---------------------------------------------------------------- loading


def _task_file(data_dir: Path, task: str, name: str) -> Path:
    return require_file(Path(data_dir) / "transfer" / task / name, task, TRANSFER_LAYOUT)


def load_binary(data_dir: Path, task: str) -> TransferTask:
    pos_name, neg_name = BINARY_FILES[task]
    pos = read_lines(_task_file(data_dir, task, pos_name))
    neg = read_lines(_task_file(data_dir, task, neg_name))
    labels = np.array([1] * len(pos) + [0] * len(neg))
    return TransferTask(task, {"all": Split(tuple(normalize(s) for s in pos + neg), labels)})


def load_sst2(data_dir: Path) -> TransferTask:
    splits = {}
    for split, name in SST2_FILES.items():
        rows = [line.rsplit("\t", 1) for line in read_lines(_task_file(data_dir, "SST2", name)) if line.strip()]
        splits[split] = Split(tuple(normalize(r[0]) for r in rows), np.array([int(r[1]) for r in rows]))
    return TransferTask("SST2", splits)


def load_trec(data_dir: Path) -> TransferTask:
    """``COARSE:fine question``; the coarse class is the label (6 classes)."""
    parsed = {}
    for split, name in TREC_FILES.items():
        # SentEval reads both files as Latin-1; the training file is not valid UTF-8.
        lines = [line for line in read_lines(_task_file(data_dir, "TREC", name), "latin-1") if line.strip()]
        parsed[split] = [(line.split(":", 1)[0], normalize(line.split(" ", 1)[1])) for line in lines]
    classes = sorted({label for rows in parsed.values() for label, _ in rows})
    index = {label: i for i, label in enumerate(classes)}
    return TransferTask("TREC", {
        split: Split(tuple(s for _, s in rows), np.array([index[label] for label, _ in rows]))
        for split, rows in parsed.items()
    })


def load_mrpc(data_dir: Path) -> TransferTask:
    """TAB columns: Quality, #1 ID, #2 ID, #1 String, #2 String; first line is a header."""
    splits = {}
    for split, name in MRPC_FILES.items():
        rows = [line.split("\t") for line in read_lines(_task_file(data_dir, "MRPC", name))[1:] if line.strip()]
        splits[split] = Split(
            tuple(normalize(r[3]) for r in rows),
            np.array([int(r[0]) for r in rows]),
            tuple(normalize(r[4]) for r in rows),
        )
    return TransferTask("MRPC", splits)


def load_transfer_task(data_dir: str | Path, name: str) -> TransferTask:
    """Load one task from ``data_dir`` (the folder holding ``transfer/``)."""
    data_dir = Path(data_dir)
    if name in BINARY_FILES:
        return load_binary(data_dir, name)
    loaders = {"SST2": load_sst2, "TREC": load_trec, "MRPC": load_mrpc}
    if name not in loaders:
        raise ValueError(f"unknown transfer task {name!r}: choose from {', '.join(TRANSFER_TASKS)}")
    return loaders[name](data_dir)


def transfer_counts(data_dir: str | Path, tasks: Sequence[str] = TRANSFER_TASKS) -> dict[str, dict[str, int]]:
    """Examples per split per task (no model needed)."""
    return {name: load_transfer_task(data_dir, name).counts() for name in tasks}


# ---------------------------------------------------------------- classifier protocol


def make_classifier(c: float, config: ClassifierConfig):  # -> sklearn Pipeline
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=config.max_iter))


def fit(c: float, config: ClassifierConfig, x_train: np.ndarray, y_train: np.ndarray):
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=config.threads):
        return make_classifier(c, config).fit(x_train, y_train)


def fit_accuracy(c: float, config: ClassifierConfig, x_train: np.ndarray, y_train: np.ndarray,
                 x_eval: np.ndarray, y_eval: np.ndarray) -> float:
    return float(np.mean(fit(c, config, x_train, y_train).predict(x_eval) == y_eval))


def _best_c(scores: dict[float, float]) -> float:
    # Highest accuracy; among equals the smallest C, i.e. the strongest regularisation.
    return max(sorted(scores), key=lambda c: scores[c])


def select_c_on_dev(x_train: np.ndarray, y_train: np.ndarray, x_dev: np.ndarray, y_dev: np.ndarray,
                    config: ClassifierConfig) -> tuple[float, dict[float, float]]:
    scores = {c: fit_accuracy(c, config, x_train, y_train, x_dev, y_dev) for c in config.c_grid}
    return _best_c(scores), scores


def select_c_by_cv(x: np.ndarray, y: np.ndarray, config: ClassifierConfig) -> tuple[float, dict[float, float]]:
    from sklearn.model_selection import StratifiedKFold

    folds = StratifiedKFold(config.inner_folds, shuffle=True, random_state=config.seed)
    splits = list(folds.split(x, y))
    scores = {
        c: float(np.mean([fit_accuracy(c, config, x[tr], y[tr], x[va], y[va]) for tr, va in splits]))
        for c in config.c_grid
    }
    return _best_c(scores), scores


def cv_protocol(x: np.ndarray, y: np.ndarray, config: ClassifierConfig) -> dict:
    """Outer stratified k-fold; C picked by inner CV on each training part."""
    from sklearn.model_selection import StratifiedKFold

    folds = StratifiedKFold(config.folds, shuffle=True, random_state=config.seed)
    accs, chosen = [], []
    for train, test in folds.split(x, y):
        c, _ = select_c_by_cv(x[train], y[train], config)
        accs.append(fit_accuracy(c, config, x[train], y[train], x[test], y[test]))
        chosen.append(c)
    return {"acc": 100 * float(np.mean(accs)), "fold_acc": [100 * a for a in accs], "C": chosen, "n": len(y)}


def dev_protocol(train: XY, dev: XY, test: XY, config: ClassifierConfig) -> dict:
    """C by dev accuracy, trained on train only, scored on test; each arg is (x, y)."""
    c, dev_scores = select_c_on_dev(*train, *dev, config)
    acc = fit_accuracy(c, config, *train, *test)
    return {"acc": 100 * acc, "dev_acc": 100 * dev_scores[c], "C": c,
            "n_train": len(train[1]), "n_dev": len(dev[1]), "n_test": len(test[1])}


def train_test_protocol(train: XY, test: XY, config: ClassifierConfig, f1: bool = False) -> dict:
    """C by k-fold CV on train, refit on all of train, scored on test; each arg is (x, y)."""
    from sklearn.metrics import f1_score

    c, cv_scores = select_c_by_cv(*train, config)
    pred = fit(c, config, *train).predict(test[0])
    out = {"acc": 100 * float(np.mean(pred == test[1])), "cv_acc": 100 * cv_scores[c], "C": c,
           "n_train": len(train[1]), "n_test": len(test[1])}
    if f1:
        out["f1"] = 100 * float(f1_score(test[1], pred))
    return out


# ---------------------------------------------------------------- evaluation


def pair_features(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.concatenate([u, v, np.abs(u - v), u * v], axis=1)


def _features(split: Split, table: EmbeddingTable) -> XY:
    x = table(split.sent1)
    if split.sent2 is not None:
        x = pair_features(x, table(split.sent2))
    return x.astype(np.float64), split.labels


def score_transfer_task(task: TransferTask, table: EmbeddingTable, config: ClassifierConfig) -> dict:
    data = {split: _features(s, table) for split, s in task.splits.items()}
    if "all" in data:
        return cv_protocol(*data["all"], config)
    if "dev" in data:
        return dev_protocol(data["train"], data["dev"], data["test"], config)
    return train_test_protocol(data["train"], data["test"], config, f1=task.name == "MRPC")


def score_transfer(
    tasks: Sequence[TransferTask],
    table: EmbeddingTable,
    config: ClassifierConfig = ClassifierConfig(),
    log: Callable[[str], None] | None = None,
) -> dict:
    """``{task: accuracy x 100, ..., "MRPC_F1": F1 x 100, "avg": mean accuracy, "details": {...}}``."""
    details = {}
    for task in tasks:
        if log:
            log(f"{task.name}: fitting classifiers")
        details[task.name] = score_transfer_task(task, table, config)
    results: dict = {name: d["acc"] for name, d in details.items()}
    results["avg"] = float(np.mean(list(results.values())))
    if "MRPC" in details:
        results["MRPC_F1"] = details["MRPC"]["f1"]
    results["details"] = details
    return results


def evaluate_transfer(
    encoder: SupportsEncode,
    data_dir: str | Path,
    tasks: Sequence[str] = TRANSFER_TASKS,
    batch_size: int = 128,
    max_length: int = 512,
    config: ClassifierConfig = ClassifierConfig(),
    progress: bool = False,
) -> dict:
    """Evaluate ``tasks``; every distinct sentence of all of them is encoded in one call."""
    loaded = [load_transfer_task(data_dir, name) for name in tasks]
    table = EmbeddingTable.encode(
        encoder, (s for t in loaded for s in t.sentences()), batch_size, max_length, progress
    )
    return score_transfer(loaded, table, config)
