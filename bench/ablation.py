"""The paper's ablation from a non-contrastive start: SimCSE, PM, HNM and HNCSE from a small BERT pretrained
only with MLM (bench/pretrain_mlm.py), then PM's open choices on STS-B dev; finished runs are skipped on a
rerun. Protocol and results: BENCHMARKS.md, "Ablation from an MLM start".
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import common
from common import REPO_ROOT, load_results, md_table, write
from quality import TASKS, prepare, train

OBJECTIVES = ("simcse", "pm", "hnm", "hncse")
TRANSFER = ["MR", "CR", "SUBJ", "MPQA", "SST2", "TREC", "MRPC"]
TRACE = ("pm/trigger_rate", "cos/positive", "cos/hardest_negative")
# PM's open choices, one factor at a time around the defaults (threshold 0.1, weights 0.8/0.2)
PM_SWEEP = [{"pm_threshold": t} for t in (0.05, 0.2, 0.3)] + [
    {"pm_w1": a, "pm_w2": round(1 - a, 2)} for a in (0.6, 0.9)]


def evaluate(model: str, out: Path, tasks: str, threads: int, pooler: str | None = None) -> dict:
    """``hncse-dist eval``'s per-task scores, with the STS and transfer averages of these tasks."""
    res = common.evaluate(model, out, tasks, threads, pooler)
    scores = {k: v for k, v in res.get("sts", {}).items() if k in (*TASKS, "avg")}
    scores.update({k: v for k, v in res.get("transfer", {}).items() if k in TRANSFER})  # not its own "avg"
    if "transfer" in res:
        scores["transfer_avg"] = statistics.mean(scores[t] for t in TRANSFER)
    return scores


def trace(run_dir: Path) -> list[dict]:
    from hncse_dist.report import read_metrics

    rows = read_metrics(run_dir / "metrics.jsonl")
    return [{"step": r["step"], **{k: r[k] for k in TRACE if k in r}} for r in rows if any(k in r for k in TRACE)]


def svg_plot(series: dict[str, list[tuple[int, float]]], path: Path, title: str) -> None:
    """A line plot with no plotting library: steps on x, values (0..1) on y."""
    w, h, pad = 640, 320, 40
    xmax = max((x for pts in series.values() for x, _ in pts), default=1)
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" '
             f'font-size="11"><rect width="{w}" height="{h}" fill="white"/>',
             f'<text x="{pad}" y="16">{title}</text>',
             f'<line x1="{pad}" y1="{h - pad}" x2="{w - 10}" y2="{h - pad}" stroke="black"/>',
             f'<line x1="{pad}" y1="{h - pad}" x2="{pad}" y2="20" stroke="black"/>',
             f'<text x="{w - 60}" y="{h - 10}">step {xmax}</text>']
    for tick in (0, 0.5, 1):
        y = h - pad - tick * (h - pad - 20)
        parts.append(f'<text x="8" y="{y + 4:.0f}">{tick}</text>')
    for i, (name, pts) in enumerate(series.items()):
        c = colors[i % len(colors)]
        xy = " ".join(f"{pad + x / xmax * (w - pad - 10):.1f},{h - pad - v * (h - pad - 20):.1f}" for x, v in pts)
        parts += [f'<polyline fill="none" stroke="{c}" stroke-width="1.5" points="{xy}"/>',
                  f'<text x="{w - 230}" y="{34 + 14 * i}" fill="{c}">{name}</text>']
    path.write_text("\n".join(parts + ["</svg>"]) + "\n")


def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.2f}" + (f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else "")


def markdown(results: dict) -> str:
    cols = [*TASKS, "avg", "transfer_avg"]
    rows = [[f"MLM start, untrained ({p})", "-", *(f"{results['untrained'][p].get(k, float('nan')):.2f}" for k in cols)]
            for p in ("cls_before_pooler", "avg") if p in results.get("untrained", {})]
    for obj in OBJECTIVES:
        rs = [r for r in results["runs"].values() if r["objective"] == obj]
        if rs:
            cells = [[r["test"][k] for r in rs if k in r["test"]] for k in cols]
            rows.append([obj, len(rs), *(mean_std(v) + ("" if len(v) == len(rs) else f" (n={len(v)})") if v else "-"
                                         for v in cells)])
    dev = [[obj, mean_std([r["best_stsb_dev"] for r in results["runs"].values() if r["objective"] == obj]),
            mean_std([r["pm_trigger_mean"] for r in results["runs"].values() if r["objective"] == obj])
            if obj in ("pm", "hncse") else "-"] for obj in OBJECTIVES
           if any(r["objective"] == obj for r in results["runs"].values())]
    sweep = [[json.dumps(s["overrides"]), len(s["dev"]), mean_std(s["dev"]), mean_std(s["trigger"])]
             for s in results.get("sweep", {}).values()]
    return ("Test (STS Spearman x100, SentEval accuracy), mean ± std over seeds; checkpoint chosen on STS-B dev:\n\n"
            + md_table(["model", "seeds", *cols], rows)
            + "\nSTS-B dev (best, x100) and PM's mean trigger rate over training:\n\n"
            + md_table(["objective", "best STS-B dev", "pm/trigger_rate"], dev)
            + "\nPM sweep (objective pm, STS-B dev only):\n\n"
            + md_table(["overrides", "seeds", "best STS-B dev", "pm/trigger_rate"], sweep))


def main() -> None:
    ap = common.parser(__doc__, steps=300, eval_every=100, batch_size=64, seeds=3, precision="bf16", threads=1,
                       model=str(REPO_ROOT / "runs" / "mlm-L4-H256"), work=REPO_ROOT / "runs" / "ablation",
                       results=common.RESULTS / "ablation.json")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--sweep-seeds", type=int, default=2, help="seeds per PM sweep setting (0: no sweep)")
    ap.add_argument("--transfer-seeds", type=int, default=1, help="seeds whose checkpoints also run SentEval transfer")
    ap.add_argument("--sweep", default=None,
                    help='only these PM sweep settings, ";"-separated, e.g. "pm_threshold=0.3;pm_w1=0.9,pm_w2=0.1"')
    ap.add_argument("--objectives", default=",".join(OBJECTIVES), help="comma-separated, of " + ",".join(OBJECTIVES))
    args = ap.parse_args()
    settings = PM_SWEEP if args.sweep is None else [
        {k: float(v) for k, v in (kv.split("=") for kv in group.split(","))} for group in args.sweep.split(";")]
    if any(opt not in PM_SWEEP for opt in settings):
        ap.error(f"--sweep: use settings of {PM_SWEEP}")
    if set(args.objectives.split(",")) - set(OBJECTIVES):
        ap.error(f"--objectives: unknown {sorted(set(args.objectives.split(',')) - set(OBJECTIVES))}")
    common.need_file(Path(args.model) / "config.json", "build the start with: python bench/pretrain_mlm.py")
    work, path, shards = prepare(args)
    results = load_results(path)
    results["setup"] = {k: v for k, v in vars(args).items() if k not in ("work", "results")}
    runs, sweep = results.setdefault("runs", {}), results.setdefault("sweep", {})
    for r in runs.values():
        r.get("test", {}).pop("details", None)

    def save() -> None:
        write(path, results, echo=False)

    results.setdefault("untrained", {})
    for pooler in ("cls_before_pooler", "avg"):
        if pooler not in results["untrained"]:
            results["untrained"][pooler] = evaluate(args.model, work / f"untrained-{pooler}.json", "sts",
                                                    args.threads, pooler)
            save()
    base = {"model_name_or_path": args.model, "learning_rate": args.lr}

    def one(name: str, overrides: dict, test: str | None) -> dict:
        s = train(name, work, shards, args, {**base, **overrides})
        points = trace(Path(s["dir"]))
        rates = [p["pm/trigger_rate"] for p in points if "pm/trigger_rate" in p]
        rec = {**overrides, "best_stsb_dev": s["best_stsb_dev"], "trace": points,
               "pm_trigger_mean": statistics.mean(rates) if rates else None}
        if test:
            rec["test"] = evaluate(str(Path(s["dir"]) / "best"), Path(s["dir"]) / f"eval-{test}.json", test,
                                   args.threads)
        return rec

    for seed in range(args.seeds):
        for obj in args.objectives.split(","):
            name = f"{obj}-seed{seed}"
            if name not in runs:
                runs[name] = one(name, {"objective": obj, "seed": seed}, test="sts")
                save()
    def sweep_pass(seed: int) -> None:
        for opt in settings:
            entry = sweep.setdefault(json.dumps(opt, sort_keys=True), {"overrides": opt, "dev": [], "trigger": []})
            if len(entry["dev"]) == seed:
                rec = one(f"sweep-{'-'.join(f'{k}{v}' for k, v in opt.items())}-seed{seed}",
                          {"objective": "pm", "seed": seed, **opt}, test=None)
                entry["dev"].append(rec["best_stsb_dev"])
                entry["trigger"].append(rec["pm_trigger_mean"])
                save()

    if args.sweep_seeds:
        sweep_pass(0)
    # SentEval (the slowest evaluation): the selected checkpoints of the first seeds, and the start
    for name, r in runs.items():
        if r["seed"] < args.transfer_seeds and "transfer_avg" not in r["test"]:
            best = work / "runs" / name / "best"
            r["test"].update(evaluate(str(best), best.parent / "eval-transfer.json", "transfer", args.threads))
            save()
    if args.transfer_seeds and "transfer_avg" not in results["untrained"]["cls_before_pooler"]:
        results["untrained"]["cls_before_pooler"].update(evaluate(
            args.model, work / "untrained-transfer.json", "transfer", args.threads, "cls_before_pooler"))
        save()
    for seed in range(1, args.sweep_seeds):
        sweep_pass(seed)
    if sweep:  # the defaults' row, from the ablation's PM runs
        pm_runs = [r for r in runs.values() if r["objective"] == "pm"]  # all the ablation's PM seeds
        sweep[json.dumps({"pm_threshold": 0.1, "pm_w1": 0.8, "pm_w2": 0.2})] = {
            "overrides": {"default": "pm_threshold 0.1, pm_w 0.8/0.2"},
            "dev": [r["best_stsb_dev"] for r in pm_runs], "trigger": [r["pm_trigger_mean"] for r in pm_runs]}
    save()
    first = {r["objective"]: r["trace"] for r in runs.values() if r["seed"] == 0}
    series = {f"{obj} seed0 {key}": [(p["step"], p[key]) for p in first[obj] if key in p]
              for obj, key in (("pm", "pm/trigger_rate"), ("hncse", "pm/trigger_rate"),
                               ("hncse", "cos/positive"), ("hncse", "cos/hardest_negative")) if obj in first}
    svg_plot(series, path.with_name(path.stem + "_pm.svg"), "PM trigger rate and cosines over training (MLM start)")
    write(path, results, markdown(results))


if __name__ == "__main__":
    main()
