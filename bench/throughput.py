"""Training-step throughput: the product's step (``Trainer.train_step``) for each objective against
sentence-transformers' MNRL step, and MFU. Command, variants, method and results: BENCHMARKS.md."""

from __future__ import annotations

import json
import os
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from common import (MINILM, bench_trainer, corpus, cpu_only, head, machine, md_table, median, need_file,
                    paired, parser, random_bert, rounds, shards_of, sync, train_step, write)

from hncse_dist.data.stream import tokenize_batch
from hncse_dist.metrics import measure_cpu_peak, peak_flops
from hncse_dist.objective import OBJECTIVES
from hncse_dist.step import contrastive_step

BATCH, MAX_LENGTH, BANK_BATCHES, LR, ST_SCALE, HEAD_LINES = 64, 32, 16, 3e-5, 20.0, 100_000
PROFILED, PROFILE_STEPS = ("hncse-simcse", "hncse-hncse", "st-mnrl"), 2


def st_step(path: str, sentences: list[str], ids: torch.Tensor, device: torch.device, precision: str):
    """sentence-transformers' SimCSE step as its Trainer runs it (BENCHMARKS.md); its collator's time."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random BERT has no modules.json: mean pooling is created
        model = SentenceTransformer(path, device=str(device))
    model.max_seq_length = MAX_LENGTH
    model.train()
    start = time.perf_counter()
    model.preprocess(sentences), model.preprocess(sentences)  # its collator tokenizes two columns
    collator_s, feats = time.perf_counter() - start, model.preprocess(sentences)
    if not torch.equal(feats["input_ids"], ids):
        raise RuntimeError("sentence-transformers and hncse-dist tokenized the batch differently")
    feats = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in feats.items()}
    loss_fn = MultipleNegativesRankingLoss(model, scale=ST_SCALE)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, fused=True)

    def step() -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = loss_fn(sentence_features=[dict(feats), dict(feats)], labels=None)  # fresh dicts: written into
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())
    return step, collator_s


def micro(trainers: dict, mb, reps: int) -> dict:
    """Alone: each objective's forward + backward on fixed views, and one AdamW step, default vs fused."""
    encoder = next(iter(trainers.values())).encoder
    with torch.no_grad():
        emb = encoder(mb.ids.repeat(2, 1), mb.mask.repeat(2, 1)).float()

    def objective(t):
        return lambda: (contrastive_step(lambda *a, **k: emb.clone().requires_grad_(), mb.ids, mb.mask, t.loss_fn,
                                         t.negatives.bank, t.negatives.generator, keys=mb.keys)[0].backward(),
                        sync(mb.ids.device))

    gen, adamw = torch.Generator().manual_seed(2), {}
    grads = [(torch.randn(p.shape, generator=gen) * 1e-3).to(p.device) for p in encoder.parameters()]
    for kind, fused in (("default", None), ("fused", True)):
        params = [torch.nn.Parameter(p.detach().clone()) for p in encoder.parameters()]
        for p, g in zip(params, grads):
            p.grad = g
        opt = torch.optim.AdamW(params, lr=LR, fused=fused)
        adamw[kind] = lambda opt=opt: (opt.step(), sync(grads[0].device))
    return {"objective_s": rounds({o: objective(t) for o, t in trainers.items()}, 2, reps, log=False)[0],
            "adamw_step_s": rounds(adamw, 1, max(5, reps // 3), log=False)[0]}


def profile(steps: dict) -> str:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    out = []
    for name, step in steps.items():
        step()  # re-warm after the timed rounds
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(PROFILE_STEPS):
                step()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=48)
        out += [f"### {name} ({PROFILE_STEPS} steps)", "", "```", table.rstrip(), "```", ""]
    return "\n".join(out)


def run_precision(prec: str, args, paths: dict, shards: str, sentences: list[str], tmp: Path, result: dict) -> str:
    """Every variant of one precision round-robin (a fresh Accelerate state: it holds one precision)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    device, steps, made = torch.device(args.device), {}, {}
    for m in args.models:
        base = dict(model_name_or_path=paths[m], train_shards=shards, batch_size=BATCH, max_seq_length=MAX_LENGTH,
                    mixed_precision="bf16" if prec == "bf16" else "no", bank_size=BANK_BATCHES, learning_rate=LR)
        trainers = {o: bench_trainer(tmp / f"{m}-{prec}-{o}", objective=o, **base) for o in OBJECTIVES}
        padded = bench_trainer(tmp / f"{m}-{prec}-padded", objective="simcse", packed_forward=False, **base)
        first, tok = trainers["simcse"], trainers["simcse"].encoder.tokenizer
        batch = tokenize_batch(tok, sentences[:BATCH], MAX_LENGTH)
        with torch.no_grad():  # steady state: a full bank for the objectives that read one
            for i in range(1, BANK_BATCHES + 1):
                bmb = first.micro_batch(tokenize_batch(tok, sentences[i * BATCH:(i + 1) * BATCH], MAX_LENGTH))
                for t in trainers.values():
                    t.negatives.push(first.model(bmb.ids, bmb.mask).float(), bmb.keys)
        for o, t in [*trainers.items(), ("simcse-padded", padded)]:
            steps[f"{m}/{prec}/hncse-{o}"] = lambda t=t, b=batch: train_step(t, [t.micro_batch(b)])
        steps[f"{m}/{prec}/st-mnrl"], result["meta"]["st_collator_s"][m] = st_step(
            paths[m], sentences[:BATCH], batch["input_ids"], device, prec)
        mb = first.micro_batch(batch)
        made[m] = (trainers, mb)
        result["models"][m] = {"path": paths[m], "params": sum(p.numel() for p in first.encoder.parameters()),
                               "padded_len": int(mb.ids.shape[1]), "real_tokens": mb.tokens,
                               "padded_tokens": 2 * mb.ids.numel(), "gflop_per_step": mb.flops / 1e9}
    dtype = torch.bfloat16 if prec == "bf16" else torch.float32
    fixed = peak_flops(device, "bf16" if prec == "bf16" else "no") if device.type == "cuda" else None  # datasheet
    peaks = result["peaks_flops_per_round"].setdefault(prec, [])
    print(f"{prec}: {len(steps)} variants, {args.warmup} + {args.steps} rounds", flush=True)
    times, losses = rounds(steps, args.warmup, args.steps,
                           after_round=lambda timed: timed and peaks.append(fixed or measure_cpu_peak(dtype, 2048)))
    for name, step_s in times.items():
        m, _, variant = name.split("/")
        kind = "st" if variant == "st-mnrl" else "ablation" if variant.endswith("-padded") else "hncse"
        result["raw"][name] = {"model": m, "precision": prec, "kind": kind, "step_s": step_s, "losses": losses[name],
                               "objective": variant.removeprefix("hncse-") if kind == "hncse" else "simcse",
                               "flops": result["models"][m]["gflop_per_step"] * 1e9}
    for m, (trainers, mb) in made.items():
        if m not in result["micro"]:  # once per model
            result["micro"][m] = micro(trainers, mb, args.micro_reps)
    names = [f"{m}/{prec}/{v}" for m in args.models for v in PROFILED]
    return profile({n: steps[n] for n in names}) if args.profile else ""


def summarize(result: dict) -> dict:
    raw, peaks, rows, out_micro = result["raw"], result["peaks_flops_per_round"], [], {}
    for name, v in raw.items():
        m, p, steps, flops = v["model"], v["precision"], v["step_s"], v["flops"]
        base, st = raw.get(f"{m}/{p}/hncse-simcse"), raw.get(f"{m}/{p}/st-mnrl")
        slow = paired(steps, base["step_s"]) if base else (None, None)
        speed = paired(st["step_s"], steps) if st else (None, None)
        rows.append({"variant": name, "model": m, "precision": p, "kind": v["kind"], "objective": v["objective"],
                     "median_step_s": median(steps), "min_step_s": min(steps), "sentences_per_s": BATCH / median(steps),
                     "slowdown_vs_hncse_simcse": slow[0], "slowdown_vs_hncse_simcse_min": slow[1],
                     "speedup_vs_st": speed[0], "speedup_vs_st_min": speed[1], "model_gflop_per_step": flops / 1e9,
                     "mfu": median([flops / t / pk for t, pk in zip(steps, peaks[p])]),
                     "mfu_best_over_best": flops / min(steps) / max(peaks[p]), "last_loss": v["losses"][-1]})
    for m, mic in result["micro"].items():
        med, low = ({o: f(t) for o, t in mic["objective_s"].items()} for f in (median, min))
        # the objective's extra cost over SimCSE's, as a share of the product's SimCSE step
        over = {r["precision"]: {o: {"median": 100 * (med[o] - med["simcse"]) / r["median_step_s"],
                                     "min": 100 * (low[o] - low["simcse"]) / r["min_step_s"]} for o in med}
                for r in rows if r["model"] == m and r["variant"].endswith("/hncse-simcse") and "simcse" in med}
        out_micro[m] = {"objective_median_s": med, "objective_min_s": low, "objective_overhead_pct_of_step": over,
                        "adamw_step_s": {k: {"median": median(t), "min": min(t)}
                                         for k, t in mic["adamw_step_s"].items()}}
    return {"rows": rows, "micro": out_micro,
            "peak_gflops": {p: {"median": median(s) / 1e9, "max": max(s) / 1e9} for p, s in peaks.items()}}


def targets(summary: dict) -> list[dict]:
    """Per (model, precision): SimCSE >= 1.3x ST, its MFU >= 50%, HNCSE <= 3% slower (step, objective alone)."""
    out = []
    for r in summary["rows"]:
        key, m, p = r["variant"].split("/")[-1], r["model"], r["precision"]
        pct = summary["micro"].get(m, {}).get("objective_overhead_pct_of_step", {}).get(p, {}).get("hncse")
        checks = {"hncse-simcse": [("hncse-simcse >= 1.3x st-mnrl", r["speedup_vs_st"], r["speedup_vs_st_min"], 1.3),
                                   ("MFU(hncse-simcse) >= 50%", r["mfu"], r["mfu_best_over_best"], 0.5)],
                  "hncse-hncse": [("hncse-hncse <= 1.03x hncse-simcse step time", r["slowdown_vs_hncse_simcse"],
                                   r["slowdown_vs_hncse_simcse_min"], -1.03)]
                  + ([("hncse objective - simcse objective <= 3% of hncse-simcse step (alone)",
                       1 + pct["median"] / 100, 1 + pct["min"] / 100, -1.03)] if pct else [])}.get(key, [])
        for target, value, best, line in checks:  # line < 0: an upper bound
            if value is None:
                continue
            ok = [x >= line if line > 0 else x <= -line for x in (value, best)]
            out.append({"target": target, "model": m, "precision": p, "value": value, "value_min": best,
                        "met": "yes" if all(ok) else "NO" if not any(ok) else "mixed"})
    return out


def markdown(result: dict) -> str:
    s, meta = result["summary"], result["meta"]

    def pair(a, b, fmt: str) -> str:
        return "-" if a is None else f"{a:{fmt}} / {b:{fmt}}"

    pct = {m: mic["objective_overhead_pct_of_step"] for m, mic in s["micro"].items()}
    return "\n".join([
        f"{meta['threads']} threads, {meta['steps']} timed rounds after {meta['warmup']} warm-up, load average "
        f"{meta['loadavg_start']:.1f} -> {meta['loadavg_end']:.1f}; matmul 2048^3 GFLOP/s median / max: "
        + ", ".join(f"{p} {v['median']:.0f} / {v['max']:.0f}" for p, v in s["peak_gflops"].items())
        + "; sentence-transformers' collator (not in its step): "
        + ", ".join(f"{m} {x * 1e3:.1f} ms" for m, x in meta.get("st_collator_s", {}).items()) + ".\n",
        md_table(["model", "precision", "variant", "step s median / min", "sentences/s median / best",
                  "time vs hncse-simcse median / best", "speed-up vs st-mnrl median / best", "GFLOP/step",
                  "MFU median / best"],
                 [[r["model"], r["precision"], r["variant"].split("/")[-1],
                   pair(r["median_step_s"], r["min_step_s"], ".3f"),
                   pair(r["sentences_per_s"], BATCH / r["min_step_s"], ".1f"),
                   pair(r["slowdown_vs_hncse_simcse"], r["slowdown_vs_hncse_simcse_min"], ".3f"),
                   pair(r["speedup_vs_st"], r["speedup_vs_st_min"], ".2f"), f"{r['model_gflop_per_step']:.1f}",
                   f"{100 * r['mfu']:.0f}% / {100 * r['mfu_best_over_best']:.0f}%"] for r in s["rows"]]),
        md_table(["model", "alone", "ms median / min", "overhead vs simcse, % of step fp32", "bf16"],
                 [[m, o, pair(1e3 * t, 1e3 * mic["objective_min_s"][o], ".2f"),
                   *(pair(pct[m][p][o]["median"], pct[m][p][o]["min"], "+.2f") if p in pct[m] else "-"
                     for p in ("fp32", "bf16"))]
                  for m, mic in s["micro"].items() for o, t in mic["objective_median_s"].items()]
                 + [[m, f"AdamW {k}", pair(1e3 * a["median"], 1e3 * a["min"], ".1f"), "-", "-"]
                    for m, mic in s["micro"].items() for k, a in mic["adamw_step_s"].items()]),
        md_table(["target", "model", "precision", "value", "best/best", "met"],
                 [[c["target"], c["model"], c["precision"],
                   *((f"{100 * c[k]:.0f}%" if "MFU" in c["target"] else f"{c[k]:.3f}x")
                     for k in ("value", "value_min")),
                   c["met"]] for c in result["targets"]])])


def report(result: dict, output: Path) -> None:
    result["summary"] = summarize(result)
    result["targets"] = targets(result["summary"])
    write(output, result, markdown(result))


def main() -> int:
    p = parser(__doc__, "throughput.json", steps=8, threads=os.cpu_count() or 1, corpus=corpus())
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--precision", choices=("fp32", "bf16", "both"), default="both")
    p.add_argument("--models", default="minilm,tiny", help="comma list of minilm, tiny")
    p.add_argument("--micro-reps", type=int, default=30, help="repetitions of the objective / AdamW alone")
    p.add_argument("--profile", action="store_true", help="torch.profiler of a few variants after timing")
    p.add_argument("--summarize-only", action="store_true", help="rebuild summary and tables from --output's raw data")
    args = p.parse_args()
    if args.summarize_only:
        report(json.loads(args.output.read_text(encoding="utf-8")), args.output)
        return 0
    if set(args.models.split(",")) - {"minilm", "tiny"}:
        p.error(f"unknown model in --models {args.models}")
    args.models = args.models.split(",")
    cpu_only(args.device)
    need_file(args.corpus)
    torch.set_num_threads(args.threads)
    # 64 + 16 x 64 distinct sentences of the corpus head, seed 0
    sentences = random.Random(0).sample(head(args.corpus, HEAD_LINES), BATCH * (1 + BANK_BATCHES))
    result = {"config": {"batch_size": BATCH, "max_length": MAX_LENGTH, "bank_batches": BANK_BATCHES, "lr": LR,
                         "st_scale": ST_SCALE, "models": args.models, "objectives": list(OBJECTIVES),
                         "corpus": str(args.corpus), "sample_seed": 0, "flops": "hncse_dist.metrics.FlopsModel"},
              "meta": {"device": args.device, "threads": args.threads, "steps": args.steps, "warmup": args.warmup,
                       "loadavg_start": os.getloadavg()[0], "st_collator_s": {}},
              "machine": machine(), "peaks_flops_per_round": {}, "micro": {}, "models": {}, "raw": {}}
    start, profiles = time.perf_counter(), []
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        shards = shards_of(sentences, tmp / "data")  # the Trainer wants data; the steps take the fixed batch
        paths = {"minilm": MINILM, "tiny": random_bert(tmp / "tiny", 128, 2)}
        for prec in (["fp32", "bf16"] if args.precision == "both" else [args.precision]):
            profiles.append(run_precision(prec, args, paths, shards, sentences, tmp, result))
    result["meta"].update(loadavg_end=os.getloadavg()[0], wall_s=time.perf_counter() - start)
    if args.profile:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.with_name(args.output.stem + "_profile.md").write_text("\n".join(profiles), encoding="utf-8")
    report(result, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
