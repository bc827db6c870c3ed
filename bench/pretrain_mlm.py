"""Pretrain a small BERT with masked-language modelling on the Wikipedia training sentences within a
wall-clock budget, save it as a BertModel folder and score it on STS (cls and avg poolers).
Model, data, schedule and results: BENCHMARKS.md, "A small BERT pretrained with MLM".
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

from common import MINILM, REPO_ROOT, corpus, evaluate, parser

CHUNK_BATCHES, WARMUP_FRACTION, HOLDOUT, LOG_EVERY, POOLERS = 100, 0.05, 2000, 100, ("cls", "avg")


def parse_args(argv=None):
    p = parser(__doc__, threads=0, batch_size=128, corpus=None)
    p.add_argument("--budget-min", type=float, default=75.0, help="wall-clock training budget in minutes")
    p.add_argument("--steps", type=int, default=0,
                   help="train exactly this many steps, the schedule in steps instead of wall-clock time "
                        "(reproducible: the same model on any machine load; --budget-min is then ignored)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--output", default=None, help="model folder (default: runs/mlm-L{layers}-H{hidden})")
    p.add_argument("--results", default=None, help="also write the report JSON here")
    args = p.parse_args(argv)
    if args.hidden % 64:
        p.error("--hidden must be a multiple of 64 (heads of 64 dimensions)")
    args.output = args.output or str(REPO_ROOT / "runs" / f"mlm-L{args.layers}-H{args.hidden}")
    args.corpus = str(args.corpus or corpus())
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


def lr_factor(done: float, total: float) -> float:
    """Warm-up over the first 5% of the budget (seconds or steps), then linear decay to 0 at its end."""
    frac = done / total
    if frac < WARMUP_FRACTION:
        return max(frac / WARMUP_FRACTION, 1e-3)
    return max(0.0, (1.0 - frac) / (1.0 - WARMUP_FRACTION))


def pretrain(args) -> dict:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, DataCollatorForLanguageModeling

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rng = random.Random(0)
    tok = AutoTokenizer.from_pretrained(MINILM)
    lines = [l for l in Path(args.corpus).read_text(encoding="utf-8").splitlines() if l.strip()]
    held_out, train_lines = lines[-HOLDOUT:], lines[:-HOLDOUT]
    cfg = BertConfig(vocab_size=len(tok), hidden_size=args.hidden, num_hidden_layers=args.layers,
                     num_attention_heads=args.hidden // 64, intermediate_size=4 * args.hidden,
                     max_position_embeddings=512, pad_token_id=tok.pad_token_id)
    model = BertForMaskedLM(cfg)
    collate = DataCollatorForLanguageModeling(tok, mlm_probability=0.15, return_tensors="pt")
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "LayerNorm" not in n]
    rest = [p for n, p in model.named_parameters() if p.ndim <= 1 or "LayerNorm" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98), eps=1e-6, fused=True)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    budget = args.budget_min * 60
    model.train()
    step = tokens = 0
    window_loss, window_acc, window_n = 0.0, 0.0, 0
    log = []
    start = time.perf_counter()
    for epoch, ids in length_grouped_batches(train_lines, tok, args.batch_size, args.max_length, rng):
        elapsed = time.perf_counter() - start
        done, total = (step, args.steps) if args.steps else (elapsed, budget)
        if done >= total:
            break
        for group in opt.param_groups:
            group["lr"] = args.lr * lr_factor(done, total)
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
        if step % LOG_EVERY == 0:
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


def evaluate_sts(args, report: dict) -> dict:
    """STS (SimCSE protocol) with each pooler, through ``hncse-dist eval``; cached per pooler."""
    for pooler in POOLERS:
        sts = evaluate(args.output, Path(args.output) / f"sts_{pooler}.json", "sts", args.threads, pooler)["sts"]
        report.setdefault("sts", {})[pooler] = {k: v for k, v in sts.items() if k != "details"}
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
    report = evaluate_sts(args, report)
    (out / "pretrain_report.json").write_text(json.dumps(report, indent=2) + "\n")
    if args.results:
        Path(args.results).parent.mkdir(parents=True, exist_ok=True)
        Path(args.results).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
