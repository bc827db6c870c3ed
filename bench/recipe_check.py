"""Paper-scale recipe check: configs/bert-base-unsup.yaml on CPU at the size of SimCSE's 1M-sentence
file with a tiny stand-in model, plus GPU time estimates. Stages and results: BENCHMARKS.md.

    python bench/recipe_check.py [--stages corpus,shards,stream,train,estimate]   # -> bench/results/recipe_check.*
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import time
from pathlib import Path
from statistics import mean, median

from common import MINILM, REPO_ROOT, MemorySampler, corpus, machine, md_table, parser, timed, write

from tests.fixtures import build_tiny_bert

RECIPE = REPO_ROOT / "configs" / "bert-base-unsup.yaml"
STAGES = ("corpus", "shards", "stream", "train", "estimate")
STREAM_BATCHES, MB = 400, 1e6
CLI = ("-m", "hncse_dist.cli")


def recipe():
    from hncse_dist.config import load_config

    return load_config(RECIPE)  # the recipe's values; its train_file is null


def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MINILM)


def dir_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) / MB


def perturb(words: list[str], rng: random.Random, other: list[str]) -> list[str]:
    roll = rng.random()
    if roll < 0.04:  # a title-like fragment
        return words[: rng.randint(2, 6)]
    if roll < 0.12:  # two sentences on one line
        return words + other
    words = list(words)
    if len(words) > 5 and rng.random() < 0.6:
        del words[rng.randrange(1, len(words))]
    if len(words) > 3 and rng.random() < 0.4:
        i = rng.randrange(1, len(words) - 1)
        words[i], words[i + 1] = words[i + 1], words[i]
    return words


def make_corpus(path: Path, lines: int, seed: int = 0) -> dict:
    """The stand-in for wiki1m: training sentences drawn with replacement and perturbed (cached)."""
    want, meta_path = {"source": str(corpus()), "lines": lines, "seed": seed}, path.with_suffix(".json")
    if path.is_file() and meta_path.is_file() and json.loads(meta_path.read_text()).get("want") == want:
        return json.loads(meta_path.read_text())
    start, pool = time.perf_counter(), corpus().read_text(encoding="utf-8").splitlines()
    rng, words = random.Random(seed), []
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(lines):
            line = perturb(rng.choice(pool).split(), rng, rng.choice(pool).split())
            words.append(len(line))
            f.write(" ".join(line) + "\n")
    meta = {"want": want, "path": str(path), "bytes": path.stat().st_size, "seconds": time.perf_counter() - start,
            "words_mean": mean(words), "words_median": median(words), "words_p95": sorted(words)[int(0.95 * lines)]}
    meta_path.write_text(json.dumps(meta, indent=2))
    return meta


def check_shards(text: Path, work: Path) -> dict:
    out = {}
    for name, extra in (("plain", []), ("gzip", ["--gzip"])):
        target = work / f"shards-{name}"
        shutil.rmtree(target, ignore_errors=True)
        res = timed(*CLI, "shards", "--input", text, "--output", target, "--quiet", *extra)
        manifest = json.loads((target / "manifest.json").read_text())
        out[name] = {**res, "dir": str(target), "shards": len(manifest["shards"]), "samples": manifest["total"],
                     "dropped": manifest.get("dropped", {}), "disk_mb": dir_mb(target)}
        print(f"shards {name}: {res['wall_s']:.1f} s, {out[name]['disk_mb']:.0f} MB", flush=True)
    return out


def check_stream(shard_dir: str, buffers: list[int], cfg) -> dict:
    """How far apart in the file a batch's sentences lie, per shuffle_buffer; first batch; memory."""
    from hncse_dist.data import ShardStream

    out, tok = {}, tokenizer()
    for buffer in buffers:
        with MemorySampler(os.getpid(), interval=0.25) as memory:
            start, spans, first = time.perf_counter(), [], None
            stream = ShardStream(shard_dir, tok, cfg.batch_size, cfg.max_seq_length, seed=42,
                                 num_workers=cfg.num_workers, shuffle_buffer=buffer, worker_start="forkserver")
            for batch in stream:
                first = first or time.perf_counter() - start
                index = sorted(int(k) for k in batch["keys"])
                spans.append(index[-1] - index[0])
                if len(spans) == STREAM_BATCHES:
                    break
            elapsed = time.perf_counter() - start
            del stream
        out[str(buffer)] = {"shuffle_buffer": buffer, "batches": len(spans), "first_batch_s": first,
                            "batches_per_s_incl_startup": len(spans) / elapsed, "batch_line_span_median": median(spans),
                            "batch_line_span_max": max(spans), "peak_pss_tree_mb": memory.peak_pss_mb}
        print(f"stream shuffle_buffer={buffer}: median span {median(spans):.0f} lines", flush=True)
    return out


def check_train(text: Path, shard_dir: str, work: Path, steps: int) -> dict:
    from hncse_dist.encoder import Encoder

    tiny = build_tiny_bert(work / "tiny-bert")
    marks = {"shards_ready": r"^train_file .* -> ", "fit_start": r"^world size", "first_step": r"^step 1/",
             "last_step": rf"^step {steps}/", "eval": r"STS-B dev Spearman"}
    out = {}
    for name, data in (("train_file", f"train_file={text}"), ("train_shards", f"train_shards={shard_dir}")):
        run = work / f"run-{name}"
        shutil.rmtree(run, ignore_errors=True)  # the implicit conversion runs again
        res = timed(*CLI, "train", "--config", RECIPE, data, f"output_dir={run}", f"model_name_or_path={tiny}",
                    f"max_steps={steps}", "mixed_precision=no", "log_every=1", "overwrite=true", marks=marks, threads=2)
        ckpts = sorted((run / "checkpoints").glob("step-*"))
        summary = json.loads((run / "summary.json").read_text())
        out[name] = {**res, "checkpoint_mb": dir_mb(ckpts[-1]) if ckpts else None,
                     "implicit_shards_mb": dir_mb(run / "shards") if (run / "shards").exists() else 0.0,
                     "summary": {k: summary.get(k) for k in ("steps", "final_loss", "best_stsb_dev", "global_batch")}}
        print(f"train with {name}: {res['wall_s']:.1f} s", flush=True)
    out["tiny_parameters"] = sum(p.numel() for p in Encoder.from_pretrained(tiny, pooler="cls").parameters())  # + head
    return out


def estimate(text: Path, samples: int, mfus: list[float], token_batches: int, bytes_per_param: float | None) -> dict:
    """Cadences of one epoch and its GPU time: FlopsModel of a bert-base-shaped Encoder (meta device)
    for real recipe batches, plus the STS-B dev evaluations, over GPU_PEAKS at assumed MFUs."""
    import torch
    from transformers import BertConfig, BertModel

    from hncse_dist.checkpoint import Checkpointer
    from hncse_dist.encoder import Encoder
    from hncse_dist.eval.sts import load_pair_file
    from hncse_dist.metrics import GPU_PEAKS, FlopsModel, MetricsWindow
    from hncse_dist.train import PACKAGED_STSB_DEV, total_steps

    cfg, tok = recipe(), tokenizer()
    steps = total_steps(cfg, samples // cfg.batch_size)  # 1 process; the trainer's own cadences of it:
    window = MetricsWindow(cfg.log_every, cfg.eval_every, steps)
    saver = Checkpointer(Path(), None, save_every=cfg.save_every)
    evals, saves, logs = (sum(map(due, range(1, steps + 1)))
                          for due in (window.eval_due, lambda s: saver.due(s, steps), window.log_due))
    with torch.device("meta"):
        encoder = Encoder(BertModel(BertConfig(), add_pooling_layer=False), tok, "cls", True)
    fm, params = FlopsModel(encoder), sum(p.numel() for p in encoder.parameters())
    lines, rng = text.read_text(encoding="utf-8").splitlines(), random.Random(1)
    masks = [tok(rng.sample(lines, cfg.batch_size), truncation=True, max_length=cfg.max_seq_length, padding="longest",
                 return_tensors="pt")["attention_mask"] for _ in range(token_batches)]
    stats = [(int(m.sum()), int(m.shape[1])) for m in masks]  # (real tokens of one view, padded length)
    flops_step = mean(fm.step(2 * real, 2 * cfg.batch_size, length) for real, length in stats)
    dev = load_pair_file(str(PACKAGED_STSB_DEV))  # evaluated as the trainer does: distinct, length-sorted
    lengths = sorted(len(i) for i in tok(list(dict.fromkeys(dev.sent1 + dev.sent2)), truncation=True,
                                         max_length=128)["input_ids"])
    batches = [lengths[i:i + cfg.eval_batch_size] for i in range(0, len(lengths), cfg.eval_batch_size)]
    dev_flops = sum(fm.step(sum(b), len(b), max(b)) / 3.0 for b in batches)  # forward only: 2x, not 6x
    train_flops, eval_flops = steps * flops_step, evals * dev_flops
    gpus = []
    for name, half, _ in GPU_PEAKS:
        if name not in ("GH200", "A800"):  # same peaks as H100 / A100
            gpus.append({"gpu": name, "peak_half_tflops": half / 1e12})
            for m in mfus:
                gpus[-1].update({f"train_min@{m:.0%}": train_flops / (half * m) / 60,
                                 f"eval_min@{m:.0%}": eval_flops / (half * m) / 60,
                                 f"step_ms@{m:.0%}": flops_step / (half * m) * 1e3,
                                 f"sentences_per_s@{m:.0%}": cfg.batch_size / (flops_step / (half * m))})
    real = [r for r, _ in stats]
    return {"recipe": {k: getattr(cfg, k) for k in (
                "batch_size", "max_seq_length", "num_epochs", "learning_rate", "warmup_steps", "eval_every",
                "save_every", "log_every", "shuffle_buffer", "num_workers", "mixed_precision", "keep_last")},
            "samples": samples, "steps_per_epoch": steps, "evaluations": evals, "checkpoints": saves,
            "log_lines": logs,
            "bert_base": {"parameters": params, "dense_parameters": fm.dense_params, "layers": fm.layers,
                          "hidden": fm.hidden},
            "checkpoint_mb_bert_base": bytes_per_param * params / MB if bytes_per_param else None,
            "tokens": {"batches_sampled": len(stats), "real_tokens_per_view_mean": mean(real),
                       "real_per_sentence": mean(real) / cfg.batch_size,
                       "padded_length_mean": mean(length for _, length in stats),
                       "real_fraction": mean(r / (cfg.batch_size * length) for r, length in stats)},
            "flops_per_step": flops_step, "flops_epoch": train_flops, "flops_evals": eval_flops,
            "stsb_dev": {"sentences": len(lengths), "tokens": sum(lengths), "flops": dev_flops},
            "mfu_assumed": mfus, "gpus": gpus}


def markdown(res: dict) -> str:
    def s(x) -> str:
        return "-" if x is None else f"{x:.1f}"

    def rss(v: dict) -> str:  # runs before the sampled VmHWM kept wait4's peak
        return f"{v.get('peak_rss_wait4_mb', v['peak_rss_mb']):.0f}"

    out = [f"Command: `{res.get('command', '')}`; machine: {res.get('machine', '')}\n"]
    if "shards" in res:
        out.append(md_table(["`hncse-dist shards`", "wall s", "CPU s", "peak RSS MB", "shards", "samples", "on disk MB"],
                            [[k, s(v["wall_s"]), s(v.get("cpu_s")), rss(v), v["shards"], f"{v['samples']:,}",
                              f"{v['disk_mb']:.0f}"] for k, v in res["shards"].items()]))
    if "stream" in res:
        out.append(md_table(["stream, shuffle_buffer", "first batch s", "batches/s (with start-up)",
                             "median span of a batch in file lines", "peak PSS MB (process + workers)"],
                            [[f"{v['shuffle_buffer']:,}", s(v["first_batch_s"]), s(v["batches_per_s_incl_startup"]),
                              f"{v['batch_line_span_median']:,.0f}", f"{v['peak_pss_tree_mb']:.0f}"]
                             for v in res["stream"].values()]))
    if "train" in res:
        out.append(md_table(["trainer (tiny model)", "shards ready s", "first step s", "whole run s", "CPU s",
                             "peak trainer RSS MB", "peak PSS MB (trainer + workers)", "implicit shards MB"],
                            [[k, s(t["marks_s"].get("shards_ready")), s(t["marks_s"].get("first_step")), s(t["wall_s"]),
                              s(t.get("cpu_s")), rss(t), f"{t['peak_pss_tree_mb']:.0f}", f"{t['implicit_shards_mb']:.0f}"]
                             for k in ("train_file", "train_shards") if (t := res["train"].get(k))]))
    if e := res.get("estimate"):
        mfus, top = e["mfu_assumed"], f"{e['mfu_assumed'][-1]:.0%}"
        facts = {"recipe": ", ".join(f"{k} {v}" for k, v in e["recipe"].items()),
                 "stand-in corpus lines / MB / words per line (mean, median, p95)": (
                     f"{res['corpus']['want']['lines']:,} / {res['corpus']['bytes'] / MB:.0f} / "
                     f"{res['corpus']['words_mean']:.1f}, {res['corpus']['words_median']:.0f}, "
                     f"{res['corpus']['words_p95']}"),
                 "samples -> steps per epoch (1 process)": f"{e['samples']:,} -> {e['steps_per_epoch']:,}",
                 "STS-B dev evaluations (distinct sentences each) / checkpoints / log lines":
                     f"{e['evaluations']} ({e['stsb_dev']['sentences']}) / {e['checkpoints']} / {e['log_lines']}",
                 "checkpoint MB (bert-base)": s(e.get("checkpoint_mb_bert_base")),
                 "real tokens per sentence / padded length / real share": (
                     f"{e['tokens']['real_per_sentence']:.1f} / {e['tokens']['padded_length_mean']:.1f} / "
                     f"{e['tokens']['real_fraction']:.0%}"),
                 "bert-base parameters / non-embedding (M)": (
                     f"{e['bert_base']['parameters'] / 1e6:.1f} / {e['bert_base']['dense_parameters'] / 1e6:.1f}"),
                 "TFLOP per step / PFLOP per epoch / PFLOP of the evaluations": (
                     f"{e['flops_per_step'] / 1e12:.2f} / {e['flops_epoch'] / 1e15:.1f} / {e['flops_evals'] / 1e15:.2f}")}
        out += [md_table(["quantity", "value"], [[k, v] for k, v in facts.items()]),
                md_table(["GPU (dense fp16/bf16 peak, TFLOP/s)",
                          *(f"epoch min @ {m:.0%} MFU (train + eval)" for m in mfus),
                          f"step ms @ {top}", f"sentences/s to feed @ {top}"],
                         [[f"{g['gpu']} ({g['peak_half_tflops']:.0f})",
                           *(f"{g[f'train_min@{m:.0%}'] + g[f'eval_min@{m:.0%}']:.1f}" for m in mfus),
                           f"{g[f'step_ms@{top}']:.1f}", f"{g[f'sentences_per_s@{top}']:,.0f}"] for g in e["gpus"]])]
    return "\n".join(out)


def main() -> int:
    p = parser(__doc__, "recipe_check.json", steps=20)
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset (results merge into --output)")
    p.add_argument("--lines", type=int, default=1_000_000, help="lines of the stand-in corpus")
    p.add_argument("--work", type=Path, default=Path("/tmp/hncse-recipe-check"), help="corpus, shards, runs (~3 GB)")
    p.add_argument("--token-batches", type=int, default=2000, help="random batches behind the FLOPs estimate")
    p.add_argument("--mfu", default="0.3,0.4", help="assumed MFUs of the GPU estimates")
    args = p.parse_args()
    if unknown := set(args.stages.split(",")) - set(STAGES) - {""}:
        p.error(f"unknown stage(s) {sorted(unknown)}: use {','.join(STAGES)}")
    res = json.loads(args.output.read_text()) if args.output.is_file() else {}
    m = machine()
    res.update(command="python bench/recipe_check.py" + "".join(f" {a}" for a in sys.argv[1:]),
               machine=f"{m['platform']}, {m['cpus']} CPUs, load average {m['load_avg'][0]:.1f} at start")
    text, cfg, stages = args.work / "wiki1m_standin.txt", recipe(), args.stages.split(",")
    res["corpus"] = make_corpus(text, args.lines)  # cheap when it exists
    if "shards" in stages:
        res["shards"] = check_shards(text, args.work)
    plain = res.get("shards", {}).get("plain", {}).get("dir")
    if "stream" in stages:
        res["stream"] = check_stream(plain, sorted({1000, cfg.shuffle_buffer}), cfg)  # the default and the recipe's
    if "train" in stages:
        res["train"] = check_train(text, plain, args.work, args.steps)
    if "estimate" in stages:
        train = res.get("train", {})
        ckpt, params = train.get("train_shards", {}).get("checkpoint_mb"), train.get("tiny_parameters")
        samples = res.get("shards", {}).get("plain", {}).get("samples", args.lines)
        res["estimate"] = estimate(text, samples, [float(x) for x in args.mfu.split(",")], args.token_batches,
                                   ckpt * MB / params if ckpt else None)
    write(args.output, res, markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
