"""Semantic textual similarity: cosine similarity vs. gold scores, Spearman x 100.

Tasks and protocol (SimCSE's evaluation setting):
  STS12..STS16     every ``STS.input.<subset>.txt`` of the year with its ``STS.gs.<subset>.txt``;
                   pairs whose gold line is empty are unscored and skipped; the reported number
                   is ONE Spearman over all subsets concatenated (SimCSE's "all"), not the mean
                   of per-subset correlations.
  STSBenchmark     ``STSBenchmark/sts-test.csv`` (TAB columns: score = col 4, sentences = 5, 6).
  SICKRelatedness  ``SICK/SICK_test_annotated.txt`` (header row; sentences = col 1, 2, score = 3).
No regressor is trained: the prediction is the cosine of the two sentence embeddings.
Sentences are whitespace-normalised, as SentEval's split/join does.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .data import MissingDataError, normalize, read_lines, require_file
from .embed import EmbeddingTable, SupportsEncode

STS_YEARS = ("STS12", "STS13", "STS14", "STS15", "STS16")
STS_TASKS = STS_YEARS + ("STSBenchmark", "SICKRelatedness")
PAIR_FILES = {
    "STSBenchmark": ("STSBenchmark", "sts-test.csv"),
    "SICKRelatedness": ("SICK", "SICK_test_annotated.txt"),
}
STS_LAYOUT = (
    "DATA_DIR/sts/STS12..STS16/STS.input.<subset>.txt + STS.gs.<subset>.txt, "
    "DATA_DIR/sts/STSBenchmark/sts-test.csv, DATA_DIR/sts/SICK/SICK_test_annotated.txt"
)
SICK_HEADER_PREFIX = "pair_ID"


@dataclass(frozen=True)
class STSSubset:
    """Scored pairs of one file (unscored pairs already removed)."""

    name: str
    sent1: tuple[str, ...]
    sent2: tuple[str, ...]
    scores: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)


@dataclass(frozen=True)
class STSTask:
    name: str
    subsets: tuple[STSSubset, ...]

    @property
    def n_pairs(self) -> int:
        return sum(len(s) for s in self.subsets)

    def sentences(self) -> Iterator[str]:
        for sub in self.subsets:
            yield from sub.sent1
            yield from sub.sent2


# ---------------------------------------------------------------- loading


def load_sts_subset(input_path: Path, gold_path: Path, name: str) -> STSSubset:
    """One SemEval subset; extra TAB columns (raw STS16 sources) are ignored."""
    pairs = [line.split("\t") for line in read_lines(input_path)]
    gold = read_lines(gold_path)
    if len(pairs) != len(gold):
        raise ValueError(f"{input_path}: {len(pairs)} pairs but {len(gold)} lines in {gold_path}")
    keep = [i for i, g in enumerate(gold) if g.strip()]
    return STSSubset(
        name=name,
        sent1=tuple(normalize(pairs[i][0]) for i in keep),
        sent2=tuple(normalize(pairs[i][1]) for i in keep),
        scores=np.array([float(gold[i]) for i in keep]),
    )


def load_sts_year(year_dir: Path, name: str) -> STSTask:
    """All subsets present in a year folder (STS13 has no SMT: it is simply not there)."""
    inputs = sorted(Path(year_dir).glob("STS.input.*.txt"))
    if not inputs:
        raise MissingDataError(f"{name}: no STS.input.*.txt files in {year_dir} (expected layout: {STS_LAYOUT})")
    subsets = []
    for path in inputs:
        subset = path.name[len("STS.input."):-len(".txt")]
        gold = require_file(path.with_name(f"STS.gs.{subset}.txt"), name, STS_LAYOUT)
        subsets.append(load_sts_subset(path, gold, subset))
    return STSTask(name, tuple(subsets))


def load_pair_file(path: str | Path, name: str = "test") -> STSSubset:
    """An STS-B csv (score col 4, sentences cols 5-6) or a SICK file (detected by its header)."""
    lines = read_lines(Path(path))
    if lines and lines[0].startswith(SICK_HEADER_PREFIX):
        rows = [line.split("\t") for line in lines[1:] if line.strip()]
        score_col, a_col, b_col = 3, 1, 2
    else:
        rows = [line.split("\t") for line in lines if line.strip()]
        score_col, a_col, b_col = 4, 5, 6
    return STSSubset(
        name=name,
        sent1=tuple(normalize(r[a_col]) for r in rows),
        sent2=tuple(normalize(r[b_col]) for r in rows),
        scores=np.array([float(r[score_col]) for r in rows]),
    )


def load_sts_task(data_dir: str | Path, name: str) -> STSTask:
    """Load one task from ``data_dir`` (the folder holding ``sts/``)."""
    sts_dir = Path(data_dir) / "sts"
    if name in STS_YEARS:
        return load_sts_year(sts_dir / name, name)
    if name in PAIR_FILES:
        path = require_file(sts_dir.joinpath(*PAIR_FILES[name]), name, STS_LAYOUT)
        return STSTask(name, (load_pair_file(path),))
    raise ValueError(f"unknown STS task {name!r}: choose from {', '.join(STS_TASKS)}")


def sts_pair_counts(data_dir: str | Path, tasks: Sequence[str] = STS_TASKS) -> dict[str, int]:
    """Scored pairs per task (no model needed)."""
    return {name: load_sts_task(data_dir, name).n_pairs for name in tasks}


# ---------------------------------------------------------------- statistics


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64) - np.mean(x)
    y = np.asarray(y, dtype=np.float64) - np.mean(y)
    denom = np.sqrt((x @ x) * (y @ y))
    return float(x @ y / denom) if denom > 0 else float("nan")


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho: Pearson correlation of average ranks (ties share their mean rank)."""
    from scipy.stats import rankdata

    return pearson(rankdata(x), rankdata(y))


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity, in float64 so ties are not invented by rounding."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.einsum("ij,ij->i", a, b) / np.maximum(norms, 1e-12)


def correlations(gold: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    return {"spearman": 100 * spearman(gold, pred), "pearson": 100 * pearson(gold, pred), "n": len(gold)}


# ---------------------------------------------------------------- evaluation


def pair_similarities(task: STSTask, table: EmbeddingTable) -> list[np.ndarray]:
    """Cosine similarity of every scored pair, one array per subset."""
    return [cosine_rows(table(sub.sent1), table(sub.sent2)) for sub in task.subsets]


def score_sts_task(task: STSTask, table: EmbeddingTable) -> dict:
    """Per-subset correlations and the pooled ("all") ones, all x 100."""
    preds = pair_similarities(task, table)
    subsets = {sub.name: correlations(sub.scores, pred) for sub, pred in zip(task.subsets, preds)}
    pooled = correlations(np.concatenate([sub.scores for sub in task.subsets]), np.concatenate(preds))
    return {**pooled, "subsets": subsets}


def score_sts(tasks: Sequence[STSTask], table: EmbeddingTable) -> dict:
    """Results dict: one pooled Spearman x 100 per task, their mean as ``avg``, ``details``."""
    details = {task.name: score_sts_task(task, table) for task in tasks}
    results: dict = {name: d["spearman"] for name, d in details.items()}
    results["avg"] = float(np.mean(list(results.values())))
    results["details"] = details
    return results


def evaluate_sts(
    encoder: SupportsEncode,
    data_dir: str | Path,
    tasks: Sequence[str] = STS_TASKS,
    batch_size: int = 128,
    max_length: int = 512,
    progress: bool = False,
) -> dict:
    """Evaluate ``tasks``; every distinct sentence of all of them is encoded in one call.

    Returns ``{task: spearman x 100, ..., "avg": mean over tasks, "details": {...}}``; with
    the default tasks the keys are STS12..STS16, STSBenchmark, SICKRelatedness, avg, details.
    """
    loaded = [load_sts_task(data_dir, name) for name in tasks]
    table = EmbeddingTable.encode(
        encoder, (s for t in loaded for s in t.sentences()), batch_size, max_length, progress
    )
    return score_sts(loaded, table)


@lru_cache(maxsize=8)
def _cached_pair_file(path: str) -> STSSubset:
    # The trainer scores the same dev file many times; parse it once.
    return load_pair_file(path)


def dev_spearman(encoder: SupportsEncode, path: str, batch_size: int = 128, max_length: int = 128) -> float:
    """Spearman x 100 of cosine similarity on one STS-B-format csv (e.g. sts-dev.csv) or SICK file."""
    pairs = _cached_pair_file(str(path))
    table = EmbeddingTable.encode(encoder, pairs.sent1 + pairs.sent2, batch_size, max_length)
    return 100 * spearman(pairs.scores, cosine_rows(table(pairs.sent1), table(pairs.sent2)))
