"""Speed of the STS evaluator (``hncse-dist eval --tasks sts``) against a naive one, with the same
scores. Method, checks and results: BENCHMARKS.md, "STS evaluation speed"; exits 1 when the scores differ.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import torch
from scipy import stats

from common import data_root, parser, write

from hncse_dist.encoder import Encoder
from hncse_dist.eval.embed import EmbeddingTable
from hncse_dist.eval.sts import STS_TASKS, cosine_rows, load_sts_task, pair_similarities, score_sts, spearman

SCORE_TOLERANCE, COS_TOLERANCE = 1e-4, 1e-5  # on the reported Spearman (x 100 / 100) and on per-pair cosines


def ours_sts(encoder: Encoder, tasks: list, batch_size: int, max_length: int) -> dict:
    """What ``hncse_dist.eval.run`` does: every distinct sentence once, then ``score_sts``."""
    table = EmbeddingTable.encode(encoder, (s for t in tasks for s in t.sentences()), batch_size, max_length)
    scores = score_sts(tasks, table)
    return {"scores": {k: v for k, v in scores.items() if k != "details"}, "encoded": len(table),
            "sims": {t.name: np.concatenate(pair_similarities(t, table)) for t in tasks}}


@torch.inference_mode()
def naive_sts(encoder: Encoder, tasks: list, batch_size: int, max_length: int) -> dict:
    """Pairs in file order, every occurrence encoded batch by batch, the model's own padded forward."""
    def embed(sentences) -> np.ndarray:
        feats = encoder.tokenize(list(sentences), max_length)
        return encoder(feats["input_ids"], feats["attention_mask"]).double().numpy()

    packed, encoder.packed = encoder.packed, False
    scores, sims, encoded = {}, {}, 0
    try:
        for t in tasks:
            a, b = [s for sub in t.subsets for s in sub.sent1], [s for sub in t.subsets for s in sub.sent2]
            sims[t.name] = np.concatenate([cosine_rows(embed(a[i:i + batch_size]), embed(b[i:i + batch_size]))
                                           for i in range(0, len(a), batch_size)])
            encoded += 2 * len(a)
            scores[t.name] = 100 * stats.spearmanr(gold(t), sims[t.name]).statistic
    finally:
        encoder.packed = packed
    scores["avg"] = float(np.mean([scores[t] for t in STS_TASKS]))
    return {"scores": scores, "sims": sims, "encoded": encoded}


def gold(task) -> np.ndarray:
    return np.concatenate([s.scores for s in task.subsets])


def main() -> int:
    p = parser(__doc__, "eval_speed.json", model="all-MiniLM-L6-v2", threads=None)
    p.add_argument("--pooler", default="avg")
    p.add_argument("--batch-size", type=int, default=128, help="the CLI's default (sentences per batch)")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3, help="runs of each evaluator, alternating which goes first")
    p.add_argument("--tolerance", type=float, default=1e-6, help="on Spearman of the cosines rounded to 5 decimals")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    encoder = Encoder.from_pretrained(args.model, pooler=args.pooler).eval()
    tasks = [load_sts_task(data_root(), name) for name in STS_TASKS]
    evaluators, runs, load = {"ours": ours_sts, "naive": naive_sts}, {}, [os.getloadavg()[0]]
    seconds = {name: {"wall": [], "cpu": []} for name in evaluators}
    for rep in range(args.repeats):
        for name in (("ours", "naive") if rep % 2 == 0 else ("naive", "ours")):
            wall, cpu = time.perf_counter(), time.process_time()
            out = evaluators[name](encoder, tasks, args.batch_size, args.max_length)
            seconds[name]["wall"].append(time.perf_counter() - wall)
            seconds[name]["cpu"].append(time.process_time() - cpu)
            if name in runs and out["scores"] != runs[name]["scores"]:
                raise AssertionError(f"{name}: scores changed between repetitions")
            runs[name] = out
            load.append(os.getloadavg()[0])
            print(f"rep {rep} {name}: {seconds[name]['wall'][-1]:.1f} s wall, {seconds[name]['cpu'][-1]:.1f} s cpu",
                  file=sys.stderr, flush=True)
    ours, naive = runs["ours"], runs["naive"]
    golds = {t.name: gold(t) for t in tasks}

    def rounded(run: dict, task: str) -> float:  # rounding restores the ties that batch noise breaks
        return spearman(golds[task], np.round(run["sims"][task], 5))

    diff = {"score": {k: abs(v - naive["scores"][k]) / 100 for k, v in ours["scores"].items()},
            "rounded_score": {t: abs(rounded(ours, t) - rounded(naive, t)) for t in STS_TASKS},
            "cosine": max(float(np.abs(ours["sims"][t] - naive["sims"][t]).max()) for t in STS_TASKS)}
    rng = np.random.default_rng(0)  # how far 1e-9 noise on our cosines (ties broken) moves each Spearman
    ties = {t: max(abs(spearman(golds[t], ours["sims"][t] + rng.normal(0, 1e-9, len(golds[t])))
                       - spearman(golds[t], ours["sims"][t])) for _ in range(3)) for t in STS_TASKS}
    ratios = {k: [n / o for n, o in zip(seconds["naive"][k], seconds["ours"][k])] for k in ("wall", "cpu")}
    speedup = {k: float(np.median(r)) for k, r in ratios.items()}
    scores = {name: run["scores"] for name, run in runs.items()}
    rounded_diff = {t: f"{v:.1e}" for t, v in diff["rounded_score"].items()}  # none for avg
    rows = ["| task | ours | naive | abs diff | diff, rounded cosines |", "|:--|--:|--:|--:|--:|"]
    rows += [f"| {t} | {scores['ours'][t]:.4f} | {scores['naive'][t]:.4f} | {diff['score'][t]:.1e} | "
             f"{rounded_diff.get(t, '-')} |" for t in [*STS_TASKS, "avg"]]
    rows += [f"| median {k} s | {np.median(seconds['ours'][k]):.1f} | {np.median(seconds['naive'][k]):.1f} | "
             f"speed-up {speedup[k]:.2f}x | |" for k in ("wall", "cpu")]
    write(args.output, {
        "model": args.model, "pooler": args.pooler, "batch_size": args.batch_size, "max_length": args.max_length,
        "device": "cpu", "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "repeats": args.repeats, "load_avg_1m": load, "scores": scores, "max_abs_diff": diff,
        "tolerances": {"rounded_score": args.tolerance, "score": SCORE_TOLERANCE, "cosine": COS_TOLERANCE},
        "seconds": {k: {kind: [round(v, 2) for v in t] for kind, t in s.items()} for k, s in seconds.items()},
        "speedup_per_repeat": {k: [round(r, 3) for r in v] for k, v in ratios.items()},
        "speedup_median": {k: round(v, 3) for k, v in speedup.items()},
        "sentences_encoded": {name: run["encoded"] for name, run in runs.items()},
        "ours_spearman_moved_by_1e-9_noise": ties}, "\n".join(rows) + "\n")
    worst = {k: max(v.values()) if isinstance(v, dict) else v for k, v in diff.items()}
    print(f"max |diff|: scores {worst['score']:.1e}, on rounded cosines {worst['rounded_score']:.1e}, cosines "
          f"{worst['cosine']:.1e}; 1e-9 noise moves ours by up to {max(ties.values()):.1e} ({max(ties, key=ties.get)})")
    failed = worst["rounded_score"] > args.tolerance or worst["score"] > SCORE_TOLERANCE or worst["cosine"] > COS_TOLERANCE
    if failed:
        print("FAIL: the evaluators disagree beyond tolerance", file=sys.stderr)
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
