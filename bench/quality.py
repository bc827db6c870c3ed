"""HNCSE vs SimCSE (and PM, HNM alone) from the packaged all-MiniLM-L6-v2 on the STS suite, after a
one-factor sweep of HNCSE's options; finished runs are skipped on a rerun. Commands (smoke run too),
protocol and results: BENCHMARKS.md, "Quality: HNCSE vs SimCSE"."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from common import RESULTS, REPO_ROOT, cli, corpus, data_root, load_results, md_table, need_file, parser, write

from hncse_dist.data.shards import write_shards
from hncse_dist.eval.sts import STS_TASKS

MIN_GAIN = 0.2  # STS-B dev points (x100) a swept value must gain over the default to replace it
TASKS = list(STS_TASKS)
SWEEP = {  # factor -> candidate overrides (the first is the default)
    "pm_w": [{"pm_w1": 0.8, "pm_w2": 0.2}, {"pm_w1": 0.6, "pm_w2": 0.4}, {"pm_w1": 0.9, "pm_w2": 0.1}],
    "hnm_km": [{"hnm_k": 10, "hnm_m": 40}, {"hnm_k": 5, "hnm_m": 20}, {"hnm_k": 20, "hnm_m": 80}],
    "hnm_alpha": [{"hnm_alpha": 0.5}, {"hnm_alpha": "null"}],
    "bank": [{"bank_size": 16}, {"bank_size": 0}, {"bank_size": 64}],
}


def prepare(args) -> tuple[Path, Path, Path]:
    """The work folder, the results file and the shards of the corpus head (built once)."""
    need_file(corpus(), "set HNCSE_DATA_DIR to the folder holding corpus/ and sts/")
    work, shards = Path(args.work), Path(args.work) / "shards"
    work.mkdir(parents=True, exist_ok=True)
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    if not (shards / "manifest.json").is_file():
        with open(corpus()) as src, open(work / "wiki_subset.txt", "w") as dst:
            dst.writelines(line for _, line in zip(range(max(40_000, args.steps * args.batch_size + 1000)), src))
        write_shards([str(work / "wiki_subset.txt")], str(shards), samples_per_shard=5000, progress=False)
    return work, Path(args.results), shards


def train(name: str, work: Path, shards: Path, args, overrides: dict) -> dict:
    """``hncse-dist train`` (skipped when finished); returns its summary.json."""
    out = work / "runs" / name
    if not (out / "summary.json").is_file():
        start = time.time()
        keys = {"max_steps": args.steps, "batch_size": args.batch_size, "mixed_precision": args.precision,
                "eval_every": args.eval_every, "save_every": 0, "keep_last": 1, "progress": "false", "log_every": 25,
                "num_workers": 1, "max_seq_length": 32, "learning_rate": 3e-5, **overrides}
        proc = cli("train", f"train_shards={shards}", f"output_dir={out}", *[f"{k}={v}" for k, v in keys.items()],
                   threads=args.threads)
        if proc.returncode != 0:
            raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
        print(f"  trained {name} in {time.time() - start:.0f} s", flush=True)
    return {**json.loads((out / "summary.json").read_text()), "dir": str(out)}


def sts_test(model_dir: str, pooler: str | None) -> dict:
    from hncse_dist.encoder import Encoder
    from hncse_dist.eval.sts import evaluate_sts

    res = evaluate_sts(Encoder.from_pretrained(model_dir, pooler=pooler), data_root(), TASKS, batch_size=128,
                       max_length=128)
    return {k: res[k] for k in [*TASKS, "avg"]}


def markdown(results: dict) -> str:
    groups: dict[str, list[dict]] = {}
    for r in results["runs"].values():
        groups.setdefault(r["objective"] + (f" {r['overrides']}" if r.get("overrides") else ""), []).append(r)
    base = ["none", "simcse", "pm", "hnm", "hncse"]
    rows = []
    for label in sorted(groups, key=lambda g: (base.index(g.split()[0]), g)):
        rs = groups[label]
        cells = [f"{statistics.mean(v):.2f}" + (f" ± {statistics.stdev(v):.2f}" if len(v) > 1 else "")
                 for v in ([r["sts"][k] for r in rs] for k in [*TASKS, "avg"])]
        rows.append(["all-MiniLM-L6-v2 untrained ([CLS])" if label == "none" else label,
                     "-" if label == "none" else len(rs), *cells])
    if "none" in groups:
        u = groups["none"][0]["sts_avg_pooler"]
        rows.append(["all-MiniLM-L6-v2 untrained (mean pooling, its native)", "-",
                     *(f"{u[k]:.2f}" for k in [*TASKS, "avg"])])
    sweep = [[v["factor"], v["overrides"], f"{v['best_stsb_dev']:.2f}"] for v in results.get("sweep", {}).values()]
    return (md_table(["model", "seeds", *TASKS, "Avg"], rows) + "\nSweep (HNCSE, seed 0, best STS-B dev x100):\n\n"
            + md_table(["factor", "overrides", "STS-B dev"], sweep) + f"\nTuned HNCSE: {results.get('tuned_hncse')}\n")


def main() -> None:
    ap = parser(__doc__, steps=250, eval_every=125, batch_size=64, seeds=3, precision="bf16", threads=None,
                work=REPO_ROOT / "runs" / "quality", results=RESULTS / "quality.json")
    ap.add_argument("--sweep-steps", type=int, default=125)
    ap.add_argument("--no-sweep", action="store_true", help="skip the sweep: HNCSE keeps the documented defaults")
    args = ap.parse_args()
    work, path, shards = prepare(args)
    results = load_results(path)
    results["setup"] = {k: v for k, v in vars(args).items() if k not in ("work", "results")}
    runs, sweep = results.setdefault("runs", {}), results.setdefault("sweep", {})

    def save() -> None:
        write(path, results, echo=False)

    if "untrained" not in runs:
        print("evaluating the untrained model", flush=True)
        runs["untrained"] = {"objective": "none", "sts": sts_test("all-MiniLM-L6-v2", "cls_before_pooler"),
                             "sts_avg_pooler": sts_test("all-MiniLM-L6-v2", "avg")}
        save()
    tuned: dict = {}  # one factor at a time around the defaults, STS-B dev only, seed 0
    for factor, options in ({} if args.no_sweep else SWEEP).items():
        for i, opt in enumerate(options):
            if f"sweep-{factor}-{i}" not in sweep:
                s = train(f"sweep-{factor}-{i}", work, shards, args,
                          {"objective": "hncse", "seed": 0, "max_steps": args.sweep_steps, **opt})
                sweep[f"sweep-{factor}-{i}"] = {"factor": factor, "overrides": opt, "best_stsb_dev": s["best_stsb_dev"]}
                save()
        scores = [sweep[f"sweep-{factor}-{i}"]["best_stsb_dev"] for i in range(len(options))]
        # One seed per setting: a value replaces the default only if it beats it by > MIN_GAIN.
        best = max(range(len(options)), key=lambda i: (scores[i] - (0 if i == 0 else MIN_GAIN), i == 0))
        tuned.update({k: v for k, v in options[best].items() if options[0].get(k) != v})
    results["tuned_hncse"] = tuned
    save()
    plan = [("simcse", s, {}) for s in range(args.seeds)] + [("hncse", s, tuned) for s in range(args.seeds)]
    plan += [("pm", 0, {k: v for k, v in tuned.items() if k.startswith("pm_")}),
             ("hnm", 0, {k: v for k, v in tuned.items() if not k.startswith("pm_")})]
    for objective, seed, opt in plan:  # the STS test suite (non-default options get their own names)
        name = f"{objective}{'-tuned' if opt else ''}-seed{seed}"
        if name in runs:
            if runs[name].get("overrides", {}) != opt:
                raise RuntimeError(f"{name} in {path} was run with {runs[name].get('overrides')}, not {opt}: "
                                   "remove it to rerun")
            continue
        s = train(name, work, shards, args, {"objective": objective, "seed": seed, **opt})
        runs[name] = {"objective": objective, "seed": seed, "overrides": opt, "best_stsb_dev": s["best_stsb_dev"],
                      "sentences_per_s": s["sentences_per_s"], "sts": sts_test(str(Path(s["dir"]) / "best"), None)}
        save()
    write(path, results, markdown(results))


if __name__ == "__main__":
    main()
