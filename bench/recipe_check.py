"""Paper-scale recipe check: configs/bert-base-unsup.yaml end to end on CPU at the size of
SimCSE's 1M-sentence Wikipedia file, with a tiny stand-in model, plus GPU time estimates.

Run from the repository root (about 10-20 minutes on a 2-core CPU, ~2.5 GB of disk in --work):

    .venv/bin/python bench/recipe_check.py

What it does, in order (``--stages`` picks some; results merge into the existing JSON):

corpus    a 1M-line stand-in for wiki1m_for_simcse.txt (``--lines``): lines of the Wikipedia
          training sentences ($HNCSE_DATA_DIR/corpus/wiki_en_sentences.txt, never evaluation
          text) drawn with replacement and perturbed (a dropped or swapped word, two sentences
          joined, a few title-like fragments), so that lengths are realistic and few lines repeat.
shards    ``hncse-dist shards --input FILE --output DIR`` as a user runs it, plain and --gzip:
          wall time, peak memory (the process's peak RSS), shards, bytes on disk.
stream    the recipe's stream (batch 64, max length 32, its num_workers) over those shards with
          the default shuffle_buffer (1000) and the recipe's: how far apart in the file the 64
          sentences of a batch lie (SimCSE's Trainer shuffles the whole file; wiki1m is stored
          article by article, so a small window puts sentences of the same article in one
          batch), the first batch's latency and the memory of the stream.
train     ``hncse-dist train --config configs/bert-base-unsup.yaml`` with the tiny model
          (tests/fixtures.py build_tiny_bert), max_steps=20, mixed_precision=no (fp16 needs a GPU):
          once with train_file=FILE (the implicit conversion into OUTPUT_DIR/shards) and once
          with train_shards=DIR (shards written beforehand): time to the first step, the whole
          run, peak memory of the trainer and its DataLoader workers (PSS, sampled).
estimate  steps per epoch and the cadences they imply (evaluations, checkpoints, log lines),
          the bytes of one checkpoint, and the expected time per epoch on common GPUs: the
          model FLOPs of a bert-base-shaped encoder (hncse_dist.metrics.FlopsModel of a random
          BertModel built from BertConfig() on the meta device, with the cls MLP head) for the
          real token counts of recipe batches (sampled from the stand-in file, tokenized as the
          stream does), plus STS-B dev evaluations, over the datasheet peaks in
          hncse_dist.metrics.GPU_PEAKS at an assumed MFU (``--mfu 0.3,0.4``). Estimates only.

Writes bench/results/recipe_check.json and bench/results/recipe_check.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from statistics import mean, median

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from tests.datadir import data_root  # noqa: E402
from tests.fixtures import MINILM, build_tiny_bert  # noqa: E402

RECIPE = REPO_ROOT / "configs" / "bert-base-unsup.yaml"
RESULTS = REPO_ROOT / "bench" / "results"
STAGES = ("corpus", "shards", "stream", "train", "estimate")
MB = 1e6


def recipe_config():
    from hncse_dist.config import TrainConfig, load_config

    # The recipe's values without its data (train_file is null in the file) or validation.
    return load_config(RECIPE), TrainConfig()


# ----------------------------------------------------------------------------- corpus


def _perturb(words: list[str], rng: random.Random, other: list[str]) -> list[str]:
    roll = rng.random()
    if roll < 0.04:  # a title / heading-like fragment (wiki1m has such lines)
        return words[: rng.randint(2, 6)]
    if roll < 0.12:  # two sentences on one line (long lines, truncated at max_seq_length)
        return words + other
    words = list(words)
    if len(words) > 5 and rng.random() < 0.6:
        del words[rng.randrange(1, len(words))]
    if len(words) > 3 and rng.random() < 0.4:
        i = rng.randrange(1, len(words) - 1)
        words[i], words[i + 1] = words[i + 1], words[i]
    return words


def make_corpus(path: Path, lines: int, seed: int) -> dict:
    source = data_root() / "corpus" / "wiki_en_sentences.txt"
    meta_path = path.with_suffix(".json")
    want = {"source": str(source), "lines": lines, "seed": seed}
    if path.is_file() and meta_path.is_file() and json.loads(meta_path.read_text()).get("want") == want:
        return json.loads(meta_path.read_text())
    t0 = time.perf_counter()
    pool = source.read_text(encoding="utf-8").splitlines()
    rng = random.Random(seed)
    words_per_line = []
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(lines):
            words = _perturb(rng.choice(pool).split(), rng, rng.choice(pool).split())
            words_per_line.append(len(words))
            f.write(" ".join(words) + "\n")
    del pool
    meta = {
        "want": want, "path": str(path), "bytes": path.stat().st_size, "seconds": time.perf_counter() - t0,
        "words_mean": mean(words_per_line), "words_median": median(words_per_line),
        "words_p95": sorted(words_per_line)[int(0.95 * lines)],
    }
    meta_path.write_text(json.dumps(meta, indent=2))
    return meta


# ----------------------------------------------------------------------------- processes


class TreeMemory:
    """Peak RSS of a process and peak PSS of it plus its descendants (DataLoader workers,
    the fork server), sampled every ``interval`` seconds."""

    def __init__(self, pid: int, interval: float = 0.5):
        import psutil

        self.proc = psutil.Process(pid)
        self.peak_rss = self.peak_tree_pss = 0
        self.max_children = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def _run(self, interval: float) -> None:
        import psutil

        while not self._stop.wait(interval):
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
                self.peak_rss = max(self.peak_rss, self.proc.memory_info().rss)
            except psutil.Error:
                continue
            pss = 0
            for p in procs:
                try:
                    pss += p.memory_full_info().pss
                except psutil.Error:
                    pass
            self.peak_tree_pss = max(self.peak_tree_pss, pss)
            self.max_children = max(self.max_children, len(procs) - 1)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return {"peak_rss_mb": self.peak_rss / MB, "peak_pss_tree_mb": self.peak_tree_pss / MB,
                "max_child_processes": self.max_children}


def run_timed(cmd: list[str], marks: dict[str, str] | None = None, env: dict | None = None,
              timeout: float = 3600) -> dict:
    """Run ``cmd``; seconds from the start to the first output line matching each regex of
    ``marks``, the wall time, the process's peak RSS (wait4) and the sampled tree memory."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})
    memory = TreeMemory(proc.pid)
    seen: dict[str, float] = {}
    tail: list[str] = []
    for line in proc.stdout:
        now = time.perf_counter() - t0
        tail = (tail + [line.rstrip()])[-40:]
        for name, pattern in (marks or {}).items():
            if name not in seen and re.search(pattern, line):
                seen[name] = now
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    out = {"cmd": " ".join(cmd), "rc": proc.returncode, "wall_s": wall, "marks_s": seen,
           "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_wait4_mb": usage.ru_maxrss * 1024 / MB,
           **memory.stop()}
    if proc.returncode != 0:
        out["tail"] = tail
        raise RuntimeError(f"{cmd[:4]} exited {proc.returncode}:\n" + "\n".join(tail))
    return out


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "hncse_dist.cli", *args]


# ----------------------------------------------------------------------------- shards


def check_shards(corpus: Path, work: Path) -> dict:
    out = {}
    for name, extra in (("plain", []), ("gzip", ["--gzip"])):
        target = work / f"shards-{name}"
        if target.exists():
            import shutil

            shutil.rmtree(target)
        res = run_timed(cli("shards", "--input", str(corpus), "--output", str(target), "--quiet", *extra))
        manifest = json.loads((target / "manifest.json").read_text())
        out[name] = {**res, "dir": str(target), "shards": len(manifest["shards"]), "samples": manifest["total"],
                     "dropped": manifest.get("dropped", {}), "disk_mb": dir_bytes(target) / MB}
        print(f"shards {name}: {res['wall_s']:.1f} s, peak RSS {res['peak_rss_wait4_mb']:.0f} MB, "
              f"{out[name]['disk_mb']:.0f} MB on disk", flush=True)
    return out


# ----------------------------------------------------------------------------- stream


def check_stream(shard_dir: str, buffers: list[int], batches: int, num_workers: int, batch_size: int,
                 max_length: int) -> dict:
    from transformers import AutoTokenizer

    from hncse_dist.data import ShardStream

    tok = AutoTokenizer.from_pretrained(MINILM)
    out = {}
    for buffer in buffers:
        memory = TreeMemory(os.getpid(), interval=0.25)
        t0 = time.perf_counter()
        stream = ShardStream(shard_dir, tok, batch_size, max_length, seed=42, num_workers=num_workers,
                             shuffle_buffer=buffer, worker_start="forkserver")
        spans, first = [], None
        for i, batch in enumerate(stream):
            if first is None:
                first = time.perf_counter() - t0
            index = sorted(int(k) for k in batch["keys"])
            spans.append(index[-1] - index[0])
            if i + 1 == batches:
                break
        elapsed = time.perf_counter() - t0
        del stream
        mem = memory.stop()
        out[str(buffer)] = {
            "shuffle_buffer": buffer, "batches": len(spans), "first_batch_s": first,
            "batches_per_s_incl_startup": len(spans) / elapsed,
            "batch_line_span_median": median(spans), "batch_line_span_max": max(spans), **mem,
        }
        print(f"stream shuffle_buffer={buffer}: first batch {first:.1f} s, median span "
              f"{median(spans):.0f} lines, tree PSS {mem['peak_pss_tree_mb']:.0f} MB", flush=True)
    return out


# ----------------------------------------------------------------------------- train


def check_train(corpus: Path, shard_dir: str, work: Path, steps: int) -> dict:
    import shutil

    tiny = build_tiny_bert(work / "tiny-bert")
    common = [f"model_name_or_path={tiny}", f"max_steps={steps}", "mixed_precision=no", "log_every=1",
              "overwrite=true"]
    marks = {"shards_ready": r"^train_file .* -> ", "fit_start": r"^world size", "first_step": r"^step 1/",
             "last_step": rf"^step {steps}/", "eval": r"STS-B dev Spearman"}
    out = {}
    for name, data in (("train_file", f"train_file={corpus}"), ("train_shards", f"train_shards={shard_dir}")):
        run_dir = work / f"run-{name}"
        shutil.rmtree(run_dir, ignore_errors=True)  # the implicit conversion runs again
        res = run_timed(cli("train", "--config", str(RECIPE), data, f"output_dir={run_dir}", *common),
                        marks=marks, env={"OMP_NUM_THREADS": "2"})
        ckpts = sorted((run_dir / "checkpoints").glob("step-*"))
        res["checkpoint_mb"] = dir_bytes(ckpts[-1]) / MB if ckpts else None
        res["implicit_shards_mb"] = dir_bytes(run_dir / "shards") / MB if (run_dir / "shards").exists() else 0.0
        res["summary"] = {k: v for k, v in json.loads((run_dir / "summary.json").read_text()).items()
                          if k in ("steps", "final_loss", "best_stsb_dev", "global_batch")}
        out[name] = res
        print(f"train with {name}: first step at {res['marks_s'].get('first_step', float('nan')):.1f} s, "
              f"done in {res['wall_s']:.1f} s, peak trainer RSS {res['peak_rss_wait4_mb']:.0f} MB, "
              f"tree PSS {res['peak_pss_tree_mb']:.0f} MB", flush=True)
    from transformers import AutoModel

    backbone = AutoModel.from_pretrained(tiny)
    hidden = backbone.config.hidden_size  # + the cls pooler's MLP head (Linear(h, h))
    out["tiny_parameters"] = sum(p.numel() for p in backbone.parameters()) + hidden * hidden + hidden
    return out


# ----------------------------------------------------------------------------- estimate


def bert_base_encoder():
    """A bert-base-uncased-shaped Encoder (cls pooler with its MLP head) on the meta device: the
    shape without weights or the hub."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from hncse_dist.encoder import Encoder

    with torch.device("meta"):
        return Encoder(BertModel(BertConfig(), add_pooling_layer=False), AutoTokenizer.from_pretrained(MINILM),
                       "cls", True)


def batch_token_stats(corpus: Path, batches: int, batch_size: int, max_length: int, seed: int) -> list[tuple[int, int]]:
    """(real tokens of one view, padded length) of ``batches`` random batches of the file,
    tokenized as the stream does (truncation at max_length, padding to the longest row)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MINILM)
    lines = corpus.read_text(encoding="utf-8").splitlines()
    rng = random.Random(seed)
    out = []
    for _ in range(batches):
        mask = tok(rng.sample(lines, batch_size), truncation=True, max_length=max_length, padding="longest",
                   return_tensors="pt")["attention_mask"]
        out.append((int(mask.sum()), int(mask.shape[1])))
    return out


def eval_flops(flops_model, batch_size: int, max_length: int = 128) -> dict:
    """Forward FLOPs of one STS-B dev evaluation as the trainer runs it (distinct sentences,
    length-sorted batches): a third of the training count (2x instead of 6x per parameter)."""
    from transformers import AutoTokenizer

    from hncse_dist.eval.sts import load_pair_file
    from hncse_dist.train import PACKAGED_STSB_DEV

    pairs = load_pair_file(str(PACKAGED_STSB_DEV))
    unique = list(dict.fromkeys(pairs.sent1 + pairs.sent2))
    tok = AutoTokenizer.from_pretrained(MINILM)
    lengths = sorted(len(ids) for ids in tok(unique, truncation=True, max_length=max_length)["input_ids"])
    flops = 0.0
    for i in range(0, len(lengths), batch_size):
        chunk = lengths[i : i + batch_size]
        flops += flops_model.step(sum(chunk), len(chunk), max(chunk)) / 3.0
    return {"sentences": len(unique), "tokens": sum(lengths), "flops": flops}


def estimate(corpus: Path, samples: int, mfus: list[float], token_batches: int, checkpoint_bytes_per_param: float | None) -> dict:
    from hncse_dist.metrics import GPU_PEAKS, FlopsModel

    cfg, defaults = recipe_config()
    world, accum = 1, cfg.gradient_accumulation_steps
    steps = samples // (cfg.batch_size * world) // accum * cfg.num_epochs
    evals = steps // cfg.eval_every + (steps % cfg.eval_every != 0) if cfg.eval_every else 1
    saves = (steps // cfg.save_every if cfg.save_every else 0) + (not cfg.save_every or steps % cfg.save_every != 0)
    encoder = bert_base_encoder()
    fm = FlopsModel(encoder)
    params = sum(p.numel() for p in encoder.parameters())
    stats = batch_token_stats(corpus, token_batches, cfg.batch_size, cfg.max_seq_length, seed=1)
    step_flops = [fm.step(2 * real, 2 * cfg.batch_size, length) for real, length in stats]
    flops_step = mean(step_flops)
    dev = eval_flops(fm, cfg.eval_batch_size)
    train_flops = steps * flops_step
    eval_total = evals * dev["flops"]
    gpus = []
    for name, half, full in GPU_PEAKS:
        if name in ("GH200", "A800"):  # same peaks as H100 / A100
            continue
        row = {"gpu": name, "peak_half_tflops": half / 1e12}
        for m in mfus:
            row[f"train_min@{m:.0%}"] = train_flops / (half * m) / 60
            row[f"eval_min@{m:.0%}"] = eval_total / (half * m) / 60
            row[f"step_ms@{m:.0%}"] = flops_step / (half * m) * 1e3
            row[f"sentences_per_s@{m:.0%}"] = cfg.batch_size / (flops_step / (half * m))  # what the stream must feed
        gpus.append(row)
    real = [r for r, _ in stats]
    return {
        "recipe": {k: getattr(cfg, k) for k in ("batch_size", "max_seq_length", "num_epochs", "learning_rate",
                                                "warmup_steps", "eval_every", "save_every", "log_every",
                                                "shuffle_buffer", "num_workers", "mixed_precision", "keep_last")},
        "defaults": {"shuffle_buffer": defaults.shuffle_buffer, "save_every": defaults.save_every},
        "samples": samples, "steps_per_epoch": steps, "evaluations": evals, "checkpoints": saves,
        "log_lines": steps // cfg.log_every + (steps % cfg.log_every != 0),
        "bert_base": {"parameters": params, "dense_parameters": fm.dense_params, "layers": fm.layers,
                      "hidden": fm.hidden},
        "checkpoint_mb_bert_base": (checkpoint_bytes_per_param * params / MB) if checkpoint_bytes_per_param else None,
        "tokens": {"batches_sampled": len(stats), "real_tokens_per_view_mean": mean(real),
                   "real_per_sentence": mean(real) / cfg.batch_size,
                   "padded_length_mean": mean(length for _, length in stats),
                   "real_fraction": mean(r / (cfg.batch_size * length) for r, length in stats)},
        "flops_per_step": flops_step, "flops_epoch": train_flops, "stsb_dev": dev, "flops_evals": eval_total,
        "mfu_assumed": mfus, "gpus": gpus,
    }


# ----------------------------------------------------------------------------- report


def _m(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.1f}"


def markdown(res: dict) -> str:
    lines = ["# Paper-scale recipe check (configs/bert-base-unsup.yaml)", "",
             f"Command: `{res.get('command', '')}`; machine: {res.get('machine', '')}", ""]
    if "corpus" in res:
        c = res["corpus"]
        lines += [f"Stand-in corpus: {c['want']['lines']:,} lines, {c['bytes'] / MB:.0f} MB, words per line mean "
                  f"{c['words_mean']:.1f} / median {c['words_median']:.0f} / p95 {c['words_p95']}.", ""]
    if "shards" in res:
        lines += ["| `hncse-dist shards` | wall s | CPU s | peak RSS MB | shards | samples | on disk MB |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for name, s in res["shards"].items():
            lines.append(f"| {name} | {s['wall_s']:.1f} | {s.get('cpu_s', float('nan')):.1f} | "
                         f"{s['peak_rss_wait4_mb']:.0f} | {s['shards']} | "
                         f"{s['samples']:,} | {s['disk_mb']:.0f} |")
        lines.append("")
    if "stream" in res:
        lines += ["| stream, shuffle_buffer | first batch s | batches/s (with start-up) | median span of a batch in file lines | "
                  "peak PSS MB (process + workers) |", "|---|---:|---:|---:|---:|"]
        for s in res["stream"].values():
            lines.append(f"| {s['shuffle_buffer']:,} | {s['first_batch_s']:.1f} | {s['batches_per_s_incl_startup']:.1f} | "
                         f"{s['batch_line_span_median']:,.0f} | {s['peak_pss_tree_mb']:.0f} |")
        lines.append("")
    if "train" in res:
        lines += ["| trainer (tiny model, 20 steps) | shards ready s | first step s | whole run s | peak trainer RSS MB | "
                  "peak PSS MB (trainer + workers) | implicit shards MB |", "|---|---:|---:|---:|---:|---:|---:|"]
        for name in ("train_file", "train_shards"):
            t = res["train"].get(name)
            if t:
                lines.append(f"| {name} | {_m(t['marks_s'].get('shards_ready'))} | {_m(t['marks_s'].get('first_step'))} | "
                             f"{t['wall_s']:.1f} | {t['peak_rss_wait4_mb']:.0f} | {t['peak_pss_tree_mb']:.0f} | "
                             f"{t['implicit_shards_mb']:.0f} |")
        lines.append("")
    if "estimate" in res:
        e = res["estimate"]
        r = e["recipe"]
        lines += [f"Recipe: batch {r['batch_size']}, max length {r['max_seq_length']}, {r['num_epochs']} epoch, "
                  f"{e['samples']:,} samples -> **{e['steps_per_epoch']:,} steps per epoch** (1 process); "
                  f"eval_every {r['eval_every']} -> {e['evaluations']} STS-B dev evaluations; save_every "
                  f"{r['save_every']} -> {e['checkpoints']} checkpoints"
                  + (f" of ~{e['checkpoint_mb_bert_base']:.0f} MB each (bert-base)" if e.get("checkpoint_mb_bert_base") else "")
                  + f"; log_every {r['log_every']} -> {e['log_lines']} log lines.", "",
                  f"Tokens (sampled {e['tokens']['batches_sampled']} random batches): "
                  f"{e['tokens']['real_per_sentence']:.1f} real tokens per sentence, padded length "
                  f"{e['tokens']['padded_length_mean']:.1f}, {e['tokens']['real_fraction']:.0%} of padded positions real. "
                  f"bert-base shape: {e['bert_base']['parameters'] / 1e6:.1f}M parameters, "
                  f"{e['bert_base']['dense_parameters'] / 1e6:.1f}M non-embedding. Model FLOPs: "
                  f"{e['flops_per_step'] / 1e12:.2f} TFLOP per step, {e['flops_epoch'] / 1e15:.1f} PFLOP per epoch, "
                  f"{e['flops_evals'] / 1e15:.2f} PFLOP for the evaluations ({e['stsb_dev']['sentences']} distinct "
                  "STS-B dev sentences each).", ""]
        mfus = e["mfu_assumed"]
        head = " | ".join(f"epoch min @ {m:.0%} MFU (train + eval)" for m in mfus)
        top = f"{mfus[-1]:.0%}"
        lines += [f"| GPU (dense fp16/bf16 peak, TFLOP/s) | {head} | step ms @ {top} | sentences/s to feed @ {top} |",
                  "|---|" + "---:|" * (len(mfus) + 2)]
        for g in e["gpus"]:
            cells = " | ".join(f"{g[f'train_min@{m:.0%}'] + g[f'eval_min@{m:.0%}']:.1f}" for m in mfus)
            lines.append(f"| {g['gpu']} ({g['peak_half_tflops']:.0f}) | {cells} | {g[f'step_ms@{top}']:.1f} | "
                         f"{g[f'sentences_per_s@{top}']:,.0f} |")
        lines += ["", "Estimates, not measurements: model FLOPs / (peak x MFU), one GPU, global batch 64; "
                  "checkpoints, best/ exports, start-up and data loading excluded. A step of 128 sequences x 32 "
                  "tokens is small: where the estimate is a few milliseconds (H100/H200), per-step host "
                  "overhead (kernel launches, Python) is likely to cap MFU below the assumption, so read those "
                  "rows as lower bounds on the time; the trainer's log line reports the real MFU."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--work", default="/tmp/hncse-recipe-check", help="corpus, shards and runs (~3 GB)")
    parser.add_argument("--steps", type=int, default=20, help="training steps of the tiny-model runs")
    parser.add_argument("--stream-batches", type=int, default=400)
    parser.add_argument("--buffers", default="", help="shuffle_buffer values of the stream stage "
                        "(default: 1000, the product's default, and the recipe's)")
    parser.add_argument("--token-batches", type=int, default=2000)
    parser.add_argument("--mfu", default="0.3,0.4")
    parser.add_argument("--output", default=str(RESULTS / "recipe_check.json"))
    args = parser.parse_args()
    stages = [s for s in args.stages.split(",") if s]
    unknown = set(stages) - set(STAGES)
    if unknown:
        parser.error(f"unknown stage(s) {sorted(unknown)}: use {','.join(STAGES)}")
    work = Path(args.work)
    out_path = Path(args.output)
    res = json.loads(out_path.read_text()) if out_path.is_file() else {}
    res["command"] = "python bench/recipe_check.py" + "".join(f" {a}" for a in sys.argv[1:])
    res["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start"
    corpus = work / "wiki1m_standin.txt"
    cfg, _ = recipe_config()
    res["corpus"] = make_corpus(corpus, args.lines, seed=0)  # cheap when it exists
    if "shards" in stages:
        res["shards"] = check_shards(corpus, work)
    plain = res.get("shards", {}).get("plain", {}).get("dir")
    if "stream" in stages:
        buffers = [int(b) for b in args.buffers.split(",")] if args.buffers else sorted({1000, cfg.shuffle_buffer})
        res["stream"] = check_stream(plain, buffers, args.stream_batches, cfg.num_workers, cfg.batch_size,
                                     cfg.max_seq_length)
    if "train" in stages:
        res["train"] = check_train(corpus, plain, work, args.steps)
    if "estimate" in stages:
        per_param = None
        train = res.get("train", {})
        if train.get("train_shards", {}).get("checkpoint_mb"):
            per_param = train["train_shards"]["checkpoint_mb"] * MB / train["tiny_parameters"]
        samples = res.get("shards", {}).get("plain", {}).get("samples", args.lines)
        res["estimate"] = estimate(corpus, samples, [float(m) for m in args.mfu.split(",")], args.token_batches,
                                   per_param)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(res, indent=2, default=str) + "\n")
    out_path.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
