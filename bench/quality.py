"""HNCSE vs SimCSE (and PM, HNM alone) from the packaged all-MiniLM-L6-v2, measured on the STS suite.

    .venv/bin/python bench/quality.py                       # full protocol, about an hour on 2 cores
    .venv/bin/python bench/quality.py --steps 20 --sweep-steps 10 --seeds 1   # smoke run
    .venv/bin/python bench/quality.py --seeds 1 --no-sweep  # one seed each, default HNCSE options

Protocol (every run: same Wikipedia sentences from $HNCSE_DATA_DIR/corpus, same steps, batch,
precision; SimCSE's selection = the STS-B dev best of the evaluations every --eval-every steps):
  1. the untrained model (row 1 of the table);
  2. a one-factor-at-a-time sweep of the open parameters around the defaults (PM w1/w2, HNM k/m,
     alpha, bank size) on STS-B dev ONLY, short runs, seed 0; the best value of each factor
     forms the tuned HNCSE config (a value must beat the default by --min-gain, 0.2 points:
     one seed cannot resolve less);
  3. SimCSE and tuned HNCSE with --seeds seeds, PM and HNM with one seed, full STS test suite.
Results accumulate in bench/results/quality.json (a rerun skips finished runs) and a markdown
table is printed and written to bench/results/quality.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TASKS = ["STS12", "STS13", "STS14", "STS15", "STS16", "STSBenchmark", "SICKRelatedness"]
SWEEP = {  # factor -> candidate overrides (the first is the default)
    "pm_w": [{"pm_w1": 0.8, "pm_w2": 0.2}, {"pm_w1": 0.6, "pm_w2": 0.4}, {"pm_w1": 0.9, "pm_w2": 0.1}],
    "hnm_km": [{"hnm_k": 10, "hnm_m": 40}, {"hnm_k": 5, "hnm_m": 20}, {"hnm_k": 20, "hnm_m": 80}],
    "hnm_alpha": [{"hnm_alpha": 0.5}, {"hnm_alpha": "null"}],
    "bank": [{"bank_size": 16}, {"bank_size": 0}, {"bank_size": 64}],
}


def data_dir() -> Path:
    from tests.datadir import data_root

    d = data_root()
    if not (d / "corpus" / "wiki_en_sentences.txt").is_file():
        sys.exit(f"no corpus under {d}: set HNCSE_DATA_DIR to the folder holding corpus/ and sts/")
    return d


def prepare_shards(work: Path, lines: int) -> Path:
    from hncse_dist.data.shards import write_shards

    shards = work / "shards"
    if not (shards / "manifest.json").is_file():
        subset = work / "wiki_subset.txt"
        with open(data_dir() / "corpus" / "wiki_en_sentences.txt") as src, open(subset, "w") as dst:
            for i, line in enumerate(src):
                if i >= lines:
                    break
                dst.write(line)
        write_shards([str(subset)], str(shards), samples_per_shard=5000, progress=False)
    return shards


def train(name: str, work: Path, shards: Path, args, overrides: dict) -> Path:
    out = work / "runs" / name
    if (out / "summary.json").is_file():
        return out
    cmd = [sys.executable, "-m", "hncse_dist.cli", "train", f"train_shards={shards}", f"output_dir={out}",
           f"max_steps={overrides.pop('max_steps', args.steps)}", f"batch_size={args.batch_size}",
           f"mixed_precision={args.precision}", f"eval_every={args.eval_every}", "save_every=0", "keep_last=1",
           "progress=false", "log_every=25", "num_workers=1", "max_seq_length=32", "learning_rate=3e-5",
           *[f"{k}={v}" for k, v in overrides.items()]]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    print(f"  trained {name} in {time.time() - t0:.0f} s", flush=True)
    return out


def sts_test(model_dir: str, pooler: str | None) -> dict:
    from hncse_dist.encoder import Encoder
    from hncse_dist.eval.sts import evaluate_sts

    enc = Encoder.from_pretrained(model_dir, pooler=pooler)
    res = evaluate_sts(enc, data_dir(), TASKS, batch_size=128, max_length=128)
    return {k: res[k] for k in [*TASKS, "avg"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--sweep-steps", type=int, default=125)
    ap.add_argument("--eval-every", type=int, default=125)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--min-gain", type=float, default=0.2,
                    help="STS-B dev points (x100) a swept value must gain over the default to replace it")
    ap.add_argument("--no-sweep", action="store_true", help="skip step 2: HNCSE keeps the documented defaults")
    ap.add_argument("--work", default=str(REPO / "runs" / "quality"))
    ap.add_argument("--results", default=str(REPO / "bench" / "results" / "quality.json"))
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results_path = Path(args.results)
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    results["setup"] = {k: v for k, v in vars(args).items() if k not in ("work", "results")}
    results.setdefault("runs", {})

    def save() -> None:
        results_path.write_text(json.dumps(results, indent=2))

    shards = prepare_shards(work, lines=max(40_000, args.steps * args.batch_size + 1000))
    runs = results["runs"]
    if "untrained" not in runs:
        print("evaluating the untrained model", flush=True)
        runs["untrained"] = {"objective": "none", "sts": sts_test("all-MiniLM-L6-v2", "cls_before_pooler"),
                             "sts_avg_pooler": sts_test("all-MiniLM-L6-v2", "avg")}
        save()

    # 2. sweep on STS-B dev only
    sweep = results.setdefault("sweep", {})
    tuned: dict = {}
    for factor, options in ({} if args.no_sweep else SWEEP).items():
        for i, opt in enumerate(options):
            name = f"sweep-{factor}-{i}"
            if name not in sweep:
                out = train(name, work, shards, args, {"objective": "hncse", "seed": 0,
                                                      "max_steps": args.sweep_steps, **opt})
                sweep[name] = {"factor": factor, "overrides": opt,
                               "best_stsb_dev": json.loads((out / "summary.json").read_text())["best_stsb_dev"]}
                save()
        scores = [sweep[f"sweep-{factor}-{i}"]["best_stsb_dev"] for i in range(len(options))]
        # One seed per setting: a value replaces the default only if it beats it by > --min-gain.
        best = max(range(len(options)), key=lambda i: (scores[i] - (0 if i == 0 else args.min_gain), i == 0))
        tuned.update({k: v for k, v in options[best].items() if options[0].get(k) != v})  # changes only
    results["tuned_hncse"] = tuned
    save()

    # 3. main comparison on the STS test suite (runs with non-default options get their own names)
    plan = [("simcse", s, {}) for s in range(args.seeds)] + [("hncse", s, tuned) for s in range(args.seeds)]
    plan += [("pm", 0, {k: v for k, v in tuned.items() if k.startswith("pm_")}),
             ("hnm", 0, {k: v for k, v in tuned.items() if not k.startswith("pm_")})]
    for objective, seed, opt in plan:
        name = f"{objective}{'-tuned' if opt else ''}-seed{seed}"
        if name in runs:
            if runs[name].get("overrides", {}) != opt:
                raise RuntimeError(f"{name} in {results_path} was run with {runs[name].get('overrides')}, "
                                   f"not {opt}: remove it to rerun")
            continue
        out = train(name, work, shards, args, {"objective": objective, "seed": seed, **opt})
        summary = json.loads((out / "summary.json").read_text())
        runs[name] = {"objective": objective, "seed": seed, "overrides": opt,
                      "best_stsb_dev": summary["best_stsb_dev"], "sentences_per_s": summary["sentences_per_s"],
                      "sts": sts_test(str(out / "best"), None)}
        save()
    table = markdown(results)
    (results_path.with_suffix(".md")).write_text(table)
    print(table)


def markdown(results: dict) -> str:
    runs = results["runs"]
    groups: dict[str, list[dict]] = {}
    for name, r in runs.items():
        label = r["objective"] + (f" {r['overrides']}" if r.get("overrides") else "")
        groups.setdefault(label, []).append(r)
    head = "| model | seeds | " + " | ".join(TASKS) + " | Avg |\n|---|---|" + "---|" * (len(TASKS) + 1) + "\n"
    rows = []
    base = ["none", "simcse", "pm", "hnm", "hncse"]
    order = sorted(groups, key=lambda g: (base.index(g.split()[0]), g))
    for obj in order:
        rs = groups[obj]
        cells = []
        for key in [*TASKS, "avg"]:
            vals = [r["sts"][key] for r in rs]
            spread = f" ± {statistics.stdev(vals):.2f}" if len(vals) > 1 else ""
            cells.append(f"{statistics.mean(vals):.2f}{spread}")
        label = "all-MiniLM-L6-v2 untrained ([CLS])" if obj == "none" else obj
        rows.append(f"| {label} | {len(rs) if obj != 'none' else '-'} | " + " | ".join(cells) + " |")
    if "none" in groups:
        u = groups["none"][0]["sts_avg_pooler"]
        rows.append("| all-MiniLM-L6-v2 untrained (mean pooling, its native) | - | "
                    + " | ".join(f"{u[k]:.2f}" for k in [*TASKS, "avg"]) + " |")
    sweep = results.get("sweep", {})
    sw = "\n\nSweep (HNCSE, seed 0, best STS-B dev x100):\n\n| factor | overrides | STS-B dev |\n|---|---|---|\n"
    sw += "\n".join(f"| {v['factor']} | {v['overrides']} | {v['best_stsb_dev']:.2f} |" for v in sweep.values())
    return head + "\n".join(rows) + sw + f"\n\nTuned HNCSE: {results.get('tuned_hncse')}\n"


if __name__ == "__main__":
    main()
