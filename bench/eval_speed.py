"""Speed of the STS evaluator against a naive one, with identical scores.

Run from the repository root:

    .venv/bin/python bench/eval_speed.py --model all-MiniLM-L6-v2 --pooler avg --threads 1

(data from ``--data-dir``, else ``$HNCSE_DATA_DIR``, else ``../shared/data``).

Both evaluators score the full STS suite (STS12-16 pooled "all", STS-B test, SICK-R test)
with the same model in the same process:
  * ours   ``hncse_dist.eval.sts.evaluate_sts``: distinct sentences of all tasks in one
           ``Encoder.encode`` call (deduplicated, length-sorted batches, padding-free forward);
  * naive  written below: pairs in file order, batches of 128 pairs, first and second
           sentences encoded batch by batch wherever they appear (no dedup, no sorting,
           the model's own padded forward), its own file parsing, scipy's spearmanr.
Checks (the script exits 1 if one fails):
  * both parse the same gold scores, pair for pair;
  * per-pair cosine similarities agree to --cos-tolerance;
  * Spearman computed on cosines rounded to 5 decimals agrees to --tolerance (1e-6, in
    correlation units) for every task;
  * the reported scores agree to --score-tolerance (1e-4).
Why raw scores are not equal to 1e-6: a sentence's float32 embedding depends on the padding of
its batch at the 1e-7 level. Ours encodes a repeated sentence once, so repeated and
self-identical pairs (STS12 has 206 and 79) tie exactly, while the naive run breaks these ties
with rounding noise; on STS12 that moves Spearman by ~2e-5. Rounding the cosines removes the
noise and the two agree.
Times are wall-clock and process CPU seconds (CPU time is steadier on a shared machine).
``--threads 1`` pins torch to one thread: on a busy 2-core machine two threads were up to 3x
slower for MiniLM (and 20x for a tiny model) than one, and made timings erratic.
Writes ``bench/results/eval_speed.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from hncse_dist.encoder import Encoder  # noqa: E402
from hncse_dist.eval.embed import EmbeddingTable  # noqa: E402
from hncse_dist.eval.sts import (  # noqa: E402
    STS_TASKS, STS_YEARS, evaluate_sts, load_sts_task, pair_similarities, spearman,
)


# ---------------------------------------------------------------- naive evaluator


def naive_pairs(data_dir: Path, task: str) -> tuple[list[str], list[str], list[float]]:
    """Scored pairs of a task in file order, parsed independently of hncse_dist.eval."""
    sts = data_dir / "sts"
    a, b, gold = [], [], []
    if task in STS_YEARS:
        for inp in sorted((sts / task).glob("STS.input.*.txt")):
            gs = inp.with_name(inp.name.replace("STS.input.", "STS.gs."))
            lines = inp.read_text(encoding="utf-8").splitlines()
            for line, score in zip(lines, gs.read_text(encoding="utf-8").splitlines()):
                if score.strip():
                    cols = line.split("\t")
                    a.append(cols[0]), b.append(cols[1]), gold.append(float(score))
    elif task == "STSBenchmark":
        for line in (sts / "STSBenchmark" / "sts-test.csv").read_text(encoding="utf-8").splitlines():
            cols = line.split("\t")
            a.append(cols[5]), b.append(cols[6]), gold.append(float(cols[4]))
    else:
        lines = (sts / "SICK" / "SICK_test_annotated.txt").read_text(encoding="utf-8").splitlines()
        for line in lines[1:]:
            cols = line.split("\t")
            a.append(cols[1]), b.append(cols[2]), gold.append(float(cols[3]))
    return a, b, gold


@torch.inference_mode()
def naive_embed(encoder: Encoder, sentences: list[str], max_length: int) -> np.ndarray:
    feats = encoder.tokenize(sentences, max_length)
    return encoder(feats["input_ids"], feats["attention_mask"]).double().numpy()


def naive_sts(encoder: Encoder, data_dir: Path, batch_size: int, max_length: int) -> dict:
    """{"scores": {task: Spearman x 100, "avg"}, "gold"/"sims": {task: per-pair arrays}, "encoded"}."""
    encoder.eval()
    packed, encoder.packed = encoder.packed, False  # naive = the model's own padded forward
    try:
        return _naive_sts(encoder, data_dir, batch_size, max_length)
    finally:
        encoder.packed = packed


def _naive_sts(encoder: Encoder, data_dir: Path, batch_size: int, max_length: int) -> dict:
    scores, golds, sims, encoded = {}, {}, {}, 0
    for task in STS_TASKS:
        a, b, gold = naive_pairs(data_dir, task)
        task_sims = []
        for start in range(0, len(gold), batch_size):
            ea = naive_embed(encoder, a[start:start + batch_size], max_length)
            eb = naive_embed(encoder, b[start:start + batch_size], max_length)
            task_sims.extend((ea * eb).sum(1) / (np.linalg.norm(ea, axis=1) * np.linalg.norm(eb, axis=1)))
            encoded += len(ea) + len(eb)
        golds[task], sims[task] = np.array(gold), np.array(task_sims)
        scores[task] = 100 * stats.spearmanr(gold, task_sims).statistic
    scores["avg"] = float(np.mean([scores[t] for t in STS_TASKS]))
    return {"scores": scores, "gold": golds, "sims": sims, "encoded": encoded}


# ---------------------------------------------------------------- ours


class RecordingEncoder:
    """Passes ``encode`` through and keeps what it returned, to check per-pair similarities."""

    def __init__(self, encoder: Encoder):
        self.encoder = encoder
        self.sentences: list[str] = []
        self.vectors = None

    def encode(self, sentences, **kwargs):
        self.sentences = list(sentences)
        self.vectors = self.encoder.encode(sentences, **kwargs)
        return self.vectors


def ours_sts(encoder: Encoder, data_dir: Path, batch_size: int, max_length: int) -> dict:
    recorder = RecordingEncoder(encoder)
    results = evaluate_sts(recorder, data_dir, STS_TASKS, batch_size, max_length)
    return {"results": results, "recorder": recorder}


def ours_pairs(data_dir: Path, recorder: RecordingEncoder) -> tuple[dict, dict]:
    """Gold scores and cosines per task, in the order the naive evaluator reads them."""
    table = EmbeddingTable(recorder.sentences, recorder.vectors.numpy())
    tasks = [load_sts_task(data_dir, name) for name in STS_TASKS]
    gold = {t.name: np.concatenate([s.scores for s in t.subsets]) for t in tasks}
    sims = {t.name: np.concatenate(pair_similarities(t, table)) for t in tasks}
    return gold, sims


# ---------------------------------------------------------------- driver


def default_data_dir() -> Path:
    from tests.datadir import data_root

    return data_root()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="all-MiniLM-L6-v2")
    p.add_argument("--pooler", default="avg")
    p.add_argument("--data-dir", type=Path, default=default_data_dir())
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--tolerance", type=float, default=1e-6, help="on Spearman of rounded cosines")
    p.add_argument("--score-tolerance", type=float, default=1e-4, help="on the reported Spearman")
    p.add_argument("--cos-tolerance", type=float, default=1e-5, help="on per-pair cosines")
    p.add_argument("--output", type=Path, default=REPO_ROOT / "bench" / "results" / "eval_speed.json")
    return p.parse_args(argv)


def timed(fn, *args) -> tuple[object, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args)
    return out, time.perf_counter() - wall, time.process_time() - cpu


def compare(ours: dict, naive: dict, gold: dict, sims: dict) -> dict:
    """Differences between the evaluators (correlations in plain units, not x 100)."""
    for task in STS_TASKS:
        if not np.array_equal(gold[task], naive["gold"][task]):
            raise AssertionError(f"{task}: the two parsers disagree on the gold scores")
    rounded = {t: abs(spearman(gold[t], np.round(sims[t], 5))
                      - stats.spearmanr(naive["gold"][t], np.round(naive["sims"][t], 5)).statistic)
               for t in STS_TASKS}
    return {
        "score": max(abs(ours[k] - naive["scores"][k]) / 100 for k in ours),
        "rounded_score": max(rounded.values()),
        "cosine": max(float(np.abs(sims[t] - naive["sims"][t]).max()) for t in STS_TASKS),
    }


def markdown(ours: dict, naive: dict, times: dict) -> str:
    rows = ["| task | ours | naive | abs diff |", "|:--|--:|--:|--:|"]
    for task in list(STS_TASKS) + ["avg"]:
        rows.append(f"| {task} | {ours[task]:.4f} | {naive[task]:.4f} | {abs(ours[task] - naive[task]):.1e} |")
    for kind in ("wall", "cpu"):
        o, n = times["ours"][kind], times["naive"][kind]
        rows.append(f"| {kind} time (s) | {o:.1f} | {n:.1f} | speed-up {n / o:.2f}x |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    encoder = Encoder.from_pretrained(args.model, pooler=args.pooler).eval()
    naive_embed(encoder, ["warm up the kernels ."] * 4, args.max_length)

    run_args = (encoder, args.data_dir, args.batch_size, args.max_length)
    mine, ours_wall, ours_cpu = timed(ours_sts, *run_args)
    naive, naive_wall, naive_cpu = timed(naive_sts, *run_args)
    ours = {k: v for k, v in mine["results"].items() if k != "details"}
    gold, sims = ours_pairs(args.data_dir, mine["recorder"])
    diff = compare(ours, naive, gold, sims)
    times = {"ours": {"wall": ours_wall, "cpu": ours_cpu}, "naive": {"wall": naive_wall, "cpu": naive_cpu}}

    report = {
        "model": args.model, "pooler": args.pooler, "batch_size": args.batch_size, "max_length": args.max_length,
        "device": "cpu", "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "load_avg_1m_at_end": os.getloadavg()[0],
        "scores": {"ours": ours, "naive": naive["scores"]},
        "max_abs_diff": diff,
        "tolerances": {"rounded_score": args.tolerance, "score": args.score_tolerance, "cosine": args.cos_tolerance},
        "seconds": {k: {kind: round(v, 2) for kind, v in t.items()} for k, t in times.items()},
        "speedup": {kind: round(naive_t / times["ours"][kind], 3) for kind, naive_t in times["naive"].items()},
        "sentences_encoded": {"ours": len(mine["recorder"].sentences), "naive": naive["encoded"]},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(ours, naive["scores"], times))
    print(f"max |diff|: scores {diff['score']:.1e}, scores on rounded cosines {diff['rounded_score']:.1e}, "
          f"cosines {diff['cosine']:.1e}; results in {args.output}")
    failed = (diff["rounded_score"] > args.tolerance or diff["score"] > args.score_tolerance
              or diff["cosine"] > args.cos_tolerance)
    if failed:
        print("FAIL: the evaluators disagree beyond tolerance", file=sys.stderr)
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
