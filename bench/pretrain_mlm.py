"""Pretrain a small BERT with masked-language modelling on the Wikipedia training sentences,
within a wall-clock budget, and score it on STS before any contrastive training.

Run from the repository root (the full run takes --budget-min plus ~5 minutes of evaluation):

    .venv/bin/python bench/pretrain_mlm.py                       # 4 layers, hidden 256, 75 minutes
    .venv/bin/python bench/pretrain_mlm.py --budget-min 2 --layers 2 --hidden 128 --output /tmp/mlm-smoke

The model: transformers' BertForMaskedLM (random init; hidden/64 heads, 4 x hidden
feed-forward, 512 positions) with the uncased WordPiece vocabulary of the packaged
all-MiniLM-L6-v2 (bert-base-uncased's vocabulary); masking by DataCollatorForLanguageModeling
(15%: 80% [MASK], 10% random, 10% kept). The vocabulary projection runs on the masked positions
only (the same loss, without 85% of the largest matmul). The data: lines of
$HNCSE_DATA_DIR/corpus/wiki_en_sentences.txt (Wikipedia, exact overlap with STS/STS-B/SICK
removed; never evaluation text), the last --holdout lines kept out for a held-out MLM loss.
Batches of --batch-size sentences grouped by length within chunks of 100 batches (less padding),
truncated at --max-length. AdamW (betas 0.9/0.98, eps 1e-6, weight decay 0.01), bf16 autocast
on CPUs that have it; learning rate warmed up over the first 5% of the budget and decayed
linearly to 0 at its end (a schedule in wall-clock time, since the number of steps is not known
ahead; --max-steps makes it step-based and the run deterministic).

The output folder is a BertModel without pooling layer (``add_pooling_layer=False``) and its
tokenizer: train with ``model_name_or_path=OUTPUT``. It is rebuilt only when absent (no
config.json): rerunning only evaluates what is missing. Evaluation is the product's:
``hncse-dist eval --model OUTPUT --tasks sts --pooler cls`` and ``--pooler avg``, SimCSE's
protocol. Everything lands in OUTPUT/pretrain_report.json (and --results when given).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from tests.datadir import data_root  # noqa: E402
from tests.fixtures import MINILM  # noqa: E402

CHUNK_BATCHES = 100  # batches per length-grouping chunk
WARMUP_FRACTION = 0.05


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget-min", type=float, default=75.0, help="wall-clock training budget in minutes")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: the budget decides)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--corpus", default=None, help="default: $HNCSE_DATA_DIR/corpus/wiki_en_sentences.txt")
    p.add_argument("--train-lines", type=int, default=0, help="use only the first N training lines (0: all)")
    p.add_argument("--holdout", type=int, default=2000, help="last lines of the corpus kept out for the held-out loss")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--output", default=None, help="model folder (default: runs/mlm-L{layers}-H{hidden})")
    p.add_argument("--results", default=None, help="also write the report JSON here")
    p.add_argument("--poolers", default="cls,avg", help="STS evaluation poolers (empty: no evaluation)")
    p.add_argument("--data-dir", default=None, help="evaluation data (default: $HNCSE_DATA_DIR, else ../shared/data)")
    args = p.parse_args(argv)
    if args.hidden % 64:
        p.error("--hidden must be a multiple of 64 (heads of 64 dimensions)")
    args.output = args.output or str(REPO_ROOT / "runs" / f"mlm-L{args.layers}-H{args.hidden}")
    args.data_dir = args.data_dir or str(data_root())
    args.corpus = args.corpus or str(Path(args.data_dir) / "corpus" / "wiki_en_sentences.txt")
    return args


def length_grouped_batches(lines: list[str], tokenizer, batch_size: int, max_length: int, rng: random.Random):
    """Endless batches of token ids (lists), epoch after epoch: the lines shuffled, cut into
    chunks of CHUNK_BATCHES batches, each chunk tokenized, sorted by length, cut into batches
    that are yielded in random order."""
    epoch = 0
    while True:
        order = list(range(len(lines)))
        rng.shuffle(order)
        chunk = CHUNK_BATCHES * batch_size
        for lo in range(0, len(order) - batch_size + 1, chunk):
            texts = [lines[i] for i in order[lo : lo + chunk]]
            ids = sorted(tokenizer(texts, truncation=True, max_length=max_length)["input_ids"], key=len)
            batches = [ids[i : i + batch_size] for i in range(0, len(ids) - batch_size + 1, batch_size)]
            rng.shuffle(batches)
            for batch in batches:
                yield epoch, batch
        epoch += 1


def masked_lm_loss(model, batch: dict):
    """BertForMaskedLM's loss with its prediction head applied to the masked positions only."""
    import torch

    hidden = model.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
    selected = batch["labels"] != -100
    logits = model.cls(hidden[selected])
    target = batch["labels"][selected]
    loss = torch.nn.functional.cross_entropy(logits.float(), target)
    return loss, (logits.argmax(-1) == target).float().mean()


def lr_factor(elapsed: float, budget: float, step: int, max_steps: int) -> float:
    """Warm-up over the first 5%, then linear decay to 0 at the end: of the steps when
    max_steps is set, of the wall-clock budget otherwise."""
    frac = step / max_steps if max_steps else elapsed / budget
    if frac < WARMUP_FRACTION:
        return max(frac / WARMUP_FRACTION, 1e-3)
    return max(0.0, (1.0 - frac) / (1.0 - WARMUP_FRACTION))


def pretrain(args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, DataCollatorForLanguageModeling

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    tok = AutoTokenizer.from_pretrained(MINILM)
    lines = [l for l in Path(args.corpus).read_text(encoding="utf-8").splitlines() if l.strip()]
    held_out, train_lines = lines[-args.holdout :], lines[: -args.holdout]
    if args.train_lines:
        train_lines = train_lines[: args.train_lines]
    cfg = BertConfig(vocab_size=len(tok), hidden_size=args.hidden, num_hidden_layers=args.layers,
                     num_attention_heads=args.hidden // 64, intermediate_size=4 * args.hidden,
                     max_position_embeddings=512, pad_token_id=tok.pad_token_id)
    model = BertForMaskedLM(cfg)
    collate = DataCollatorForLanguageModeling(tok, mlm_probability=0.15, return_tensors="pt")
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "LayerNorm" not in n]
    rest = [p for n, p in model.named_parameters() if p.ndim <= 1 or "LayerNorm" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98), eps=1e-6, fused=True)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16")
    budget = args.budget_min * 60
    model.train()
    step = tokens = 0
    window_loss, window_acc, window_n = 0.0, 0.0, 0
    log = []
    start = time.perf_counter()
    for epoch, ids in length_grouped_batches(train_lines, tok, args.batch_size, args.max_length, rng):
        elapsed = time.perf_counter() - start
        if (args.max_steps and step >= args.max_steps) or (not args.max_steps and elapsed >= budget):
            break
        for group in opt.param_groups:
            group["lr"] = args.lr * lr_factor(elapsed, budget, step, args.max_steps)
        batch = collate([{"input_ids": x} for x in ids])
        with autocast:
            loss, acc = masked_lm_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        tokens += int(batch["attention_mask"].sum())
        window_loss, window_acc, window_n = window_loss + loss.item(), window_acc + acc.item(), window_n + 1
        if step % args.log_every == 0:
            rec = {"step": step, "epoch": epoch, "minutes": elapsed / 60, "loss": window_loss / window_n,
                   "masked_acc": window_acc / window_n, "lr": opt.param_groups[0]["lr"], "tokens": tokens}
            log.append(rec)
            print(json.dumps(rec), flush=True)
            window_loss, window_acc, window_n = 0.0, 0.0, 0
    train_s = time.perf_counter() - start
    held = held_out_loss(model, tok, held_out, collate, args, autocast)
    out = Path(args.output)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.bert.save_pretrained(tmp)  # BertModel, built without a pooling layer by BertForMaskedLM
    tok.save_pretrained(tmp)
    report = {
        "model": {"layers": args.layers, "hidden": args.hidden, "heads": args.hidden // 64,
                  "parameters_backbone": sum(p.numel() for p in model.bert.parameters())},
        "args": {k: v for k, v in vars(args).items() if k not in ("output", "results")},
        "train_lines": len(train_lines), "steps": step, "epochs_seen": step * args.batch_size / len(train_lines),
        "tokens_seen": tokens, "train_minutes": train_s / 60, "tokens_per_s": tokens / max(train_s, 1e-9),
        "final_train_loss": log[-1]["loss"] if log else None, "held_out": held, "log": log,
    }
    (tmp / "pretrain_report.json").write_text(json.dumps(report, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.rename(tmp, out)
    return report


def held_out_loss(model, tok, lines: list[str], collate, args, autocast) -> dict:
    """Masked-LM loss and accuracy on the held-out lines, with a fixed masking seed."""
    import torch

    model.eval()
    torch.manual_seed(1234)
    losses, accs, weights = [], [], []
    with torch.no_grad():
        for lo in range(0, len(lines), args.batch_size):
            ids = tok(lines[lo : lo + args.batch_size], truncation=True, max_length=args.max_length)["input_ids"]
            batch = collate([{"input_ids": x} for x in ids])
            n = int((batch["labels"] != -100).sum())
            if n == 0:
                continue
            with autocast:
                loss, acc = masked_lm_loss(model, batch)
            losses.append(float(loss) * n)
            accs.append(float(acc) * n)
            weights.append(n)
    model.train()
    total = max(sum(weights), 1)
    return {"lines": len(lines), "masked_tokens": sum(weights), "loss": sum(losses) / total,
            "masked_acc": sum(accs) / total, "perplexity": math.exp(sum(losses) / total)}


def evaluate(args: argparse.Namespace, report: dict) -> dict:
    """STS (SimCSE protocol) with each pooler, through ``hncse-dist eval``; cached per pooler."""
    out = Path(args.output)
    scores = report.setdefault("sts", {})
    for pooler in filter(None, args.poolers.split(",")):
        result_file = out / f"sts_{pooler}.json"
        if not result_file.is_file():
            cmd = [sys.executable, "-m", "hncse_dist.cli", "eval", "--model", str(out), "--tasks", "sts",
                   "--pooler", pooler, "--data-dir", args.data_dir, "--output", str(result_file), "--no-progress"]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            subprocess.run(cmd, cwd=REPO_ROOT, check=True)
        sts = json.loads(result_file.read_text())["sts"]
        scores[pooler] = {k: v for k, v in sts.items() if k != "details"}
        print(f"STS with pooler {pooler}: avg {sts['avg']:.2f}", flush=True)
    return report


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.output)
    if (out / "config.json").is_file():
        print(f"{out} exists: not rebuilt (remove it to pretrain again)", flush=True)
        report = json.loads((out / "pretrain_report.json").read_text())
    else:
        report = pretrain(args)
        print(f"pretrained {report['steps']} steps ({report['tokens_seen']:,} tokens, "
              f"{report['epochs_seen']:.2f} epochs) in {report['train_minutes']:.1f} min; held-out MLM loss "
              f"{report['held_out']['loss']:.3f}, masked accuracy {report['held_out']['masked_acc']:.3f} -> {out}",
              flush=True)
    if args.poolers:
        report = evaluate(args, report)
    (out / "pretrain_report.json").write_text(json.dumps(report, indent=2) + "\n")
    if args.results:
        Path(args.results).parent.mkdir(parents=True, exist_ok=True)
        Path(args.results).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
