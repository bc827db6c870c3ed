"""Speed of the STS evaluator against a naive one, with the same scores.

Run from the repository root:

    .venv/bin/python bench/eval_speed.py --model all-MiniLM-L6-v2 --pooler avg --threads 1 --repeats 3

(data from ``--data-dir``, else ``$HNCSE_DATA_DIR``, else ``../shared/data``).

Both evaluators score the full STS suite (STS12-16 pooled "all", STS-B test, SICK-R test)
with the same model, in the same process, ``--repeats`` times, alternating which goes first:
  * ours   what ``hncse-dist eval --tasks sts`` runs (``hncse_dist.eval.run``): the tasks'
           distinct sentences in one ``Encoder.encode`` call, then ``score_sts``;
  * naive  written below: pairs in file order, batches of 128 pairs, first and second
           sentences encoded batch by batch wherever they appear (no dedup, no sorting,
           the model's own padded forward), its own file parsing, scipy's spearmanr.
The speed-up reported is the median over the repetitions of naive time / our time (wall
clock and process CPU seconds; CPU time is steadier on a shared machine).
Checks (the script exits 1 if one fails):
  * both parse the same gold scores, pair for pair;
  * per-pair cosine similarities agree to --cos-tolerance;
  * Spearman of the cosines rounded to 5 decimals agrees to --tolerance (1e-6, in
    correlation units) for every task;
  * the reported Spearman agrees to --score-tolerance (1e-4).
Why the reported Spearman is compared to 1e-4 only: a float32 embedding depends on the other
sentences of its batch at the 1e-7 level. Ours encodes a repeated sentence once, so repeated
pairs (STS12 has 206) tie exactly, while the naive run breaks those ties with rounding noise,
and breaking them moves STS12's Spearman by ~1e-5 whatever the noise's size (reported: our
cosines plus 1e-9 Gaussian noise, 3 seeds). Rounding the cosines restores the ties; then the
two agree.
Also reported: the token positions (padding included) each evaluator runs through the model.
The matrix products take most of both evaluators' time, so at equal threads the ratio of
positions bounds the speed-up.
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

from hncse_dist.encoder import DEFAULT_MAX_TOKENS, Encoder, _length_batches  # noqa: E402
from hncse_dist.eval.embed import EmbeddingTable  # noqa: E402
from hncse_dist.eval.sts import (  # noqa: E402
    STS_TASKS, STS_YEARS, load_sts_task, pair_similarities, score_sts, spearman,
)
from tests.datadir import data_root  # noqa: E402

# ---------------------------------------------------------------- the two evaluators


def ours_sts(encoder: Encoder, data_dir: Path, batch_size: int, max_length: int) -> dict:
    """The steps of ``hncse_dist.eval.run.run`` for ``--tasks sts``; also returns the cosines."""
    tasks = [load_sts_task(data_dir, name) for name in STS_TASKS]
    table = EmbeddingTable.encode(encoder, (s for t in tasks for s in t.sentences()), batch_size, max_length)
    results = score_sts(tasks, table)
    return {"scores": {k: v for k, v in results.items() if k != "details"},
            "gold": {t.name: np.concatenate([s.scores for s in t.subsets]) for t in tasks},
            "sims": {t.name: np.concatenate(pair_similarities(t, table)) for t in tasks},
            "encoded": len(table)}


def naive_pairs(data_dir: Path, task: str) -> tuple[list[str], list[str], list[float]]:
    """Scored pairs of a task in file order, parsed independently of hncse_dist.eval."""
    sts = data_dir / "sts"
    a, b, gold = [], [], []
    if task in STS_YEARS:
        for inp in sorted((sts / task).glob("STS.input.*.txt")):
            scores = inp.with_name(inp.name.replace("STS.input.", "STS.gs.")).read_text(encoding="utf-8")
            for line, score in zip(inp.read_text(encoding="utf-8").splitlines(), scores.splitlines()):
                if score.strip():
                    cols = line.split("\t")
                    a.append(cols[0]), b.append(cols[1]), gold.append(float(score))
        return a, b, gold
    path, skip, cols = ((sts / "STSBenchmark" / "sts-test.csv", 0, (5, 6, 4)) if task == "STSBenchmark"
                        else (sts / "SICK" / "SICK_test_annotated.txt", 1, (1, 2, 3)))
    for line in path.read_text(encoding="utf-8").splitlines()[skip:]:
        row = line.split("\t")
        a.append(row[cols[0]]), b.append(row[cols[1]]), gold.append(float(row[cols[2]]))
    return a, b, gold


@torch.inference_mode()
def naive_embed(encoder: Encoder, sentences: list[str], max_length: int) -> np.ndarray:
    feats = encoder.tokenize(sentences, max_length)
    return encoder(feats["input_ids"], feats["attention_mask"]).double().numpy()


def naive_sts(encoder: Encoder, data_dir: Path, batch_size: int, max_length: int) -> dict:
    encoder.eval()
    packed, encoder.packed = encoder.packed, False  # naive = the model's own padded forward
    scores, golds, sims, encoded = {}, {}, {}, 0
    try:
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
    finally:
        encoder.packed = packed
    scores["avg"] = float(np.mean([scores[t] for t in STS_TASKS]))
    return {"scores": scores, "gold": golds, "sims": sims, "encoded": encoded}


def token_positions(encoder: Encoder, data_dir: Path, batch_size: int, max_length: int) -> dict:
    """Token positions each evaluator runs through the model, padding included: the work."""
    def tokens(sentences) -> list[list[int]]:
        return encoder.tokenizer(list(sentences), truncation=True, max_length=max_length)["input_ids"]

    naive = 0
    for task in STS_TASKS:
        for side in naive_pairs(data_dir, task)[:2]:
            n = [len(ids) for ids in tokens(side)]
            naive += sum(len(n[s:s + batch_size]) * max(n[s:s + batch_size]) for s in range(0, len(n), batch_size))
    sentences = {s for name in STS_TASKS for s in load_sts_task(data_dir, name).sentences()}
    n = [len(ids) for ids in {tuple(ids) for ids in tokens(sentences)}]
    ours = sum(len(b) * max(n[i] for i in b) for b in _length_batches(n, batch_size, DEFAULT_MAX_TOKENS))
    return {"ours": ours, "naive": naive, "ratio": round(naive / ours, 3)}


EVALUATORS = {"ours": ours_sts, "naive": naive_sts}

# ---------------------------------------------------------------- driver


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="all-MiniLM-L6-v2")
    p.add_argument("--pooler", default="avg")
    p.add_argument("--data-dir", type=Path, default=data_root())
    p.add_argument("--batch-size", type=int, default=128, help="the CLI's default (sentences per batch)")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each evaluator, alternating")
    p.add_argument("--tolerance", type=float, default=1e-6, help="on Spearman of rounded cosines")
    p.add_argument("--score-tolerance", type=float, default=1e-4, help="on the reported Spearman")
    p.add_argument("--cos-tolerance", type=float, default=1e-5, help="on per-pair cosines")
    p.add_argument("--output", type=Path, default=REPO_ROOT / "bench" / "results" / "eval_speed.json")
    return p.parse_args(argv)


def differences(ours: dict, naive: dict) -> dict:
    """Largest differences between the evaluators (correlations in plain units, not x 100)."""
    for task in STS_TASKS:
        if not np.array_equal(ours["gold"][task], naive["gold"][task]):
            raise AssertionError(f"{task}: the two parsers disagree on the gold scores")

    def rounded(run: dict, task: str) -> float:
        return spearman(run["gold"][task], np.round(run["sims"][task], 5))

    return {
        "score": {k: abs(v - naive["scores"][k]) / 100 for k, v in ours["scores"].items()},
        "rounded_score": {t: abs(rounded(ours, t) - rounded(naive, t)) for t in STS_TASKS},
        "cosine": max(float(np.abs(ours["sims"][t] - naive["sims"][t]).max()) for t in STS_TASKS),
    }


def tie_sensitivity(run: dict, seeds: int = 3, sigma: float = 1e-9) -> dict:
    """How far each task's Spearman moves when noise of ``sigma`` breaks the ties of ``run``'s cosines."""
    rng = np.random.default_rng(0)
    return {t: max(abs(spearman(run["gold"][t], run["sims"][t] + rng.normal(0, sigma, len(run["sims"][t])))
                       - spearman(run["gold"][t], run["sims"][t])) for _ in range(seeds)) for t in STS_TASKS}


def markdown(scores: dict, diff: dict, speedup: dict, seconds: dict) -> str:
    rows = ["| task | ours | naive | abs diff | diff, rounded cosines |", "|:--|--:|--:|--:|--:|"]
    for task in list(STS_TASKS) + ["avg"]:
        rows.append(f"| {task} | {scores['ours'][task]:.4f} | {scores['naive'][task]:.4f} | "
                    f"{diff['score'][task]:.1e} | {diff['rounded_score'].get(task, float('nan')):.1e} |")
    for kind in ("wall", "cpu"):
        o, n = np.median(seconds["ours"][kind]), np.median(seconds["naive"][kind])
        rows.append(f"| median {kind} s | {o:.1f} | {n:.1f} | speed-up {speedup[kind]:.2f}x | |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    encoder = Encoder.from_pretrained(args.model, pooler=args.pooler).eval()
    naive_embed(encoder, ["warm up the kernels ."] * 4, args.max_length)
    seconds = {name: {"wall": [], "cpu": []} for name in EVALUATORS}
    load = [os.getloadavg()[0]]
    runs: dict = {}
    for rep in range(args.repeats):
        for name in (("ours", "naive") if rep % 2 == 0 else ("naive", "ours")):
            wall, cpu = time.perf_counter(), time.process_time()
            out = EVALUATORS[name](encoder, args.data_dir, args.batch_size, args.max_length)
            seconds[name]["wall"].append(time.perf_counter() - wall)
            seconds[name]["cpu"].append(time.process_time() - cpu)
            if name in runs and out["scores"] != runs[name]["scores"]:
                raise AssertionError(f"{name}: scores changed between repetitions")
            runs[name] = out
            load.append(os.getloadavg()[0])
            print(f"rep {rep} {name}: {seconds[name]['wall'][-1]:.1f} s wall, {seconds[name]['cpu'][-1]:.1f} s cpu",
                  file=sys.stderr, flush=True)
    ratios = {kind: [n / o for n, o in zip(seconds["naive"][kind], seconds["ours"][kind])] for kind in ("wall", "cpu")}
    speedup = {kind: float(np.median(r)) for kind, r in ratios.items()}
    diff = differences(runs["ours"], runs["naive"])
    scores = {name: run["scores"] for name, run in runs.items()}
    positions = token_positions(encoder, args.data_dir, args.batch_size, args.max_length)
    ties = tie_sensitivity(runs["ours"])
    report = {
        "model": args.model, "pooler": args.pooler, "batch_size": args.batch_size, "max_length": args.max_length,
        "device": "cpu", "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "repeats": args.repeats, "load_avg_1m": load, "scores": scores, "max_abs_diff": diff,
        "tolerances": {"rounded_score": args.tolerance, "score": args.score_tolerance, "cosine": args.cos_tolerance},
        "seconds": {k: {kind: [round(v, 2) for v in t] for kind, t in s.items()} for k, s in seconds.items()},
        "speedup_per_repeat": {k: [round(r, 3) for r in v] for k, v in ratios.items()},
        "speedup_median": {k: round(v, 3) for k, v in speedup.items()},
        "sentences_encoded": {name: run["encoded"] for name, run in runs.items()},
        "token_positions": positions,
        "ours_spearman_moved_by_1e-9_noise": ties,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(scores, diff, speedup, seconds))
    worst = {k: max(v.values()) if isinstance(v, dict) else v for k, v in diff.items()}
    print(f"max |diff|: scores {worst['score']:.1e}, scores on rounded cosines {worst['rounded_score']:.1e}, "
          f"cosines {worst['cosine']:.1e}; ours with ties broken by 1e-9 noise moves by up to "
          f"{max(ties.values()):.1e} ({max(ties, key=ties.get)})")
    print(f"token positions through the model: ours {positions['ours']:,}, naive {positions['naive']:,} "
          f"({positions['ratio']:.2f}x); load average {min(load):.1f}-{max(load):.1f}; results in {args.output}")
    failed = (worst["rounded_score"] > args.tolerance or worst["score"] > args.score_tolerance
              or worst["cosine"] > args.cos_tolerance)
    if failed:
        print("FAIL: the evaluators disagree beyond tolerance", file=sys.stderr)
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
