"""The training loop: Accelerate (DDP or DeepSpeed ZeRO), one forward over both views,
the HNCSE objective across ranks, the negative bank, TensorBoard, evaluation, checkpoints
and preemption.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .bank import NegativeBank, sentence_keys
from .checkpoint import Checkpointer
from .config import ConfigError, TrainConfig
from .encoder import Encoder
from .gather import all_ranks_agree
from .metrics import (STSB_DEV_KEY, FlopsModel, MetricsLog, hparams_of, memory_gb, parse_report_to, peak_flops,
                      progress_line, steady_rate)
from .objective import alignment, hncse_loss, uniformity

REQUEUE_EXIT_CODE = 75  # "checkpointed after a preemption signal: requeue me" (EX_TEMPFAIL)
INTERRUPT_EXIT_CODE = 130  # checkpointed after Ctrl-C (the shell's code for SIGINT)
PACKAGED_STSB_DEV = Path(__file__).parent / "resources" / "sts-dev.csv"


class TrainingDiverged(RuntimeError):
    """The loss stayed non-finite: stopping is better than skipping forever."""


class PreemptionFlag:
    """Set by SIGTERM / SIGUSR1 (Slurm's warning signals) and SIGINT (Ctrl-C); acted on
    between steps: checkpoint, then exit. A second SIGINT interrupts at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self) -> None:
        self.raised: int | None = None
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.raised == signal.SIGINT:
            raise KeyboardInterrupt
        self.raised = signum

    @property
    def exit_code(self) -> int:
        return INTERRUPT_EXIT_CODE if self.raised == signal.SIGINT else REQUEUE_EXIT_CODE

    def describe(self) -> str:
        return "Ctrl-C" if self.raised == signal.SIGINT else "preemption signal"


def make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, DistributedDataParallelKwargs, InitProcessGroupKwargs
    from datetime import timedelta

    on_gpu = torch.cuda.is_available()
    # Without an explicit backend, DeepSpeed on CPU leaves every rank believing it is alone.
    pg = InitProcessGroupKwargs(backend="nccl" if on_gpu else "gloo", timeout=timedelta(minutes=30))
    expected = int(os.environ.get("WORLD_SIZE", "1"))
    trackers = [t for t in parse_report_to(cfg.report_to) if t != "tensorboard"]  # TensorBoard is written directly
    kwargs = dict(
        log_with=trackers or None,
        **({"project_dir": cfg.output_dir} if trackers else {}),
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        # Gradients as views of DDP's buckets: one copy of the gradients instead of two.
        kwargs_handlers=([pg] if expected > 1 else []) + [DistributedDataParallelKwargs(gradient_as_bucket_view=True)],
    )
    if cfg.deepspeed:
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(
            hf_ds_config=cfg.deepspeed,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            gradient_clipping=cfg.max_grad_norm,
        )
    else:
        kwargs["cpu"] = not on_gpu
    if cfg.deepspeed and expected == 1:
        # DeepSpeed wants a process group even for one process.
        os.environ.setdefault("RANK", "0"); os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1"); os.environ.setdefault("MASTER_PORT", "29511")
        kwargs["kwargs_handlers"] = [pg, *kwargs["kwargs_handlers"]]
    acc = Accelerator(**kwargs)
    if cfg.deepspeed:
        # No DataLoader goes through prepare(), so DeepSpeed learns the micro-batch here.
        acc.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.batch_size
    if acc.num_processes != expected:
        raise RuntimeError(
            f"launcher started WORLD_SIZE={expected} but Accelerate formed a world of {acc.num_processes}: "
            "launch with 'hncse-dist train --nproc-per-node N' or torchrun"
        )
    return acc


def contrastive_step(model, ids, mask, objective: str, obj_cfg, bank: NegativeBank | None = None,
                     generator: torch.Generator | None = None, read_bank: bool = True, packing=None):
    """Loss of one (micro-)batch: ONE forward over both dropout views (2N sequences), then
    the objective across ranks. ``bank`` is read as HNM candidates if ``read_bank`` (False
    during its warm-up). Returns (loss, z1, z2, to_push, stats): ``to_push`` is the global
    batch's detached (z2, sentence keys) that the loss gathered, for ``bank.push`` after the
    step (None when there is no bank), so filling the bank costs no communication.
    ``packing``: ``Encoder.packing_for`` of ``mask.repeat(2, 1)``, built before the transfer."""
    views = (ids.repeat(2, 1), mask.repeat(2, 1))
    emb = (model(*views) if packing is None else model(*views, packing=packing)).float()
    z1, z2 = emb.chunk(2)
    keys = sentence_keys(ids, mask)
    has_bank = bank is not None and bank.batches > 0
    bank_z, bank_k = bank.contents() if has_bank and read_bank else (None, None)
    gathered = {} if has_bank else None
    loss, stats = hncse_loss(z1, z2, objective, bank_z, config=obj_cfg, keys=keys, bank_keys=bank_k,
                             generator=generator, return_stats=True, gathered=gathered)
    to_push = (gathered["z2"], gathered["keys"]) if has_bank else None
    return loss, z1, z2, to_push, stats


def build_stream(cfg: TrainConfig, tokenizer, acc):
    from .data.shards import ensure_shards
    from .data.stream import ShardStream

    shard_dir = cfg.train_shards
    if shard_dir is None:
        cache = Path(cfg.output_dir) / "shards"
        with acc.main_process_first():
            try:
                shard_dir = ensure_shards(cfg.train_file, str(cache), encoding=cfg.train_file_encoding,
                                          allow_repairs=cfg.train_file_allow_repairs, report=acc.is_main_process)
            except ValueError as err:  # refused input (binary, mis-encoded, an archive): a config problem
                raise ConfigError(str(err)) from None
    from .data.tario import ShardError

    try:
        stream = ShardStream(
            shard_dir, tokenizer, cfg.batch_size, cfg.max_seq_length, seed=cfg.seed,
            rank=acc.process_index, world_size=acc.num_processes,
            num_workers=cfg.num_workers, shuffle_buffer=cfg.shuffle_buffer,
            skip_corrupt=cfg.skip_corrupt, resampled=cfg.resampled,
            manifest=cfg.train_manifest, text_key=cfg.text_key,
            shard_retries=cfg.shard_retries, retry_delay=cfg.shard_retry_delay,
        )
    except (ShardError, ValueError) as err:  # no manifest / counts, unreadable source, too little data
        raise ConfigError(str(err)) from None
    if stream.skipped_shards:
        acc.print(stream.skip_report())
    return stream


def total_steps(cfg: TrainConfig, batches_per_epoch: int) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    steps = cfg.num_epochs * batches_per_epoch // cfg.gradient_accumulation_steps
    if steps < 1:
        raise ConfigError("the data holds less than one global batch: lower batch_size or add data")
    return steps


def _eval_dev(cfg: TrainConfig, encoder: Encoder) -> float | None:
    from .eval.sts import dev_spearman

    path = PACKAGED_STSB_DEV if cfg.eval_file == "packaged" else cfg.eval_file
    if path is None:
        return None
    return dev_spearman(encoder, str(path), batch_size=cfg.eval_batch_size)


def train(cfg: TrainConfig) -> int:
    """Run training; returns the process exit code (0, or REQUEUE_EXIT_CODE after preemption)."""
    from accelerate.utils import set_seed
    from transformers import get_linear_schedule_with_warmup

    cfg.validate()
    preempt = PreemptionFlag()
    acc = make_accelerator(cfg)
    rank, world_size = acc.process_index, acc.num_processes
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    set_seed(cfg.seed)  # identical head initialisation on every rank
    encoder = Encoder.from_pretrained(cfg.model_name_or_path, cfg.pooler, cfg.mlp_only_train,
                                      packed=cfg.packed_forward)
    if cfg.gradient_checkpointing:
        encoder.enable_checkpointing()
    set_seed(cfg.seed + rank)  # dropout masks differ per rank
    stream = build_stream(cfg, encoder.tokenizer, acc)
    steps = total_steps(cfg, stream.batches_per_epoch)

    flops_model = FlopsModel(encoder)
    peak = peak_flops(acc.device, cfg.mixed_precision, cfg.peak_flops)
    # The fused kernel (CPU and CUDA) is ~4x faster than the per-tensor loop on MiniLM (bench/throughput.py).
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                  fused=True)
    scheduler = get_linear_schedule_with_warmup(optimizer, cfg.warmup_steps, steps)
    model, optimizer = acc.prepare(encoder, optimizer)
    # The scheduler is stepped by hand: Accelerate's wrapper would step it once per process.
    acc.register_for_checkpointing(scheduler)
    bank = NegativeBank(cfg.bank_size if cfg.objective in ("hnm", "hncse") else 0)
    hnm_gen = torch.Generator(device=acc.device).manual_seed(cfg.seed * 1000 + rank)
    ckpt = Checkpointer(out_dir / "checkpoints", acc, keep_last=cfg.keep_last)

    state = {"step": 0, "best_dev": float("-inf"), "micro_step": 0}
    if cfg.resume:
        resumed = ckpt.resolve(cfg.resume)
        if resumed is not None:
            extra = ckpt.load(resumed)
            state.update(extra["trainer"])
            bank.load_state_dict(extra["bank"], device=acc.device)
            stream.load_state_dict(extra["data"])
            hnm_gen.set_state(extra["generator"])
            acc.print(f"resumed from {resumed} at step {state['step']}")
        elif cfg.resume != "latest":
            raise ConfigError(f"resume={cfg.resume}: no complete checkpoint there")

    def save(tag_step: int) -> None:
        ckpt.save(tag_step, {"trainer": state, "bank": bank.state_dict(), "data": stream.state_dict(),
                             "generator": hnm_gen.get_state(), "param_digest": parameter_digest(model)})

    trackers = parse_report_to(cfg.report_to)
    if any(t != "tensorboard" for t in trackers):
        acc.init_trackers(cfg.run_name or out_dir.name, config=hparams_of(asdict(cfg)))
    log = MetricsLog(out_dir, acc.is_main_process, trackers, acc)
    if acc.is_main_process:
        (out_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2, default=str))
    acc.print(f"world size {world_size} | global batch {cfg.batch_size * world_size} | "
              f"{steps} steps | objective {cfg.objective} | device {acc.device}")
    obj_cfg = cfg.objective_config()
    bar = None
    if cfg.progress and acc.is_main_process and sys.stderr.isatty():  # no bar spam in batch logs
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=state["step"], desc="train", unit="step", dynamic_ncols=True)

    exit_code = 0
    window_start, window_steps, window_stats = time.perf_counter(), 0, {}
    window_tokens, window_flops = 0, 0.0
    skips = NonFiniteSkips(cfg.max_nonfinite_skips, cfg.log_every)
    model.train()
    while state["step"] < steps and exit_code == 0:
        for batch in stream:
            # Index bookkeeping of the padding-free forward from the CPU mask: no GPU sync.
            packing = encoder.packing_for(batch["attention_mask"].repeat(2, 1), acc.device)
            real_tokens = 2 * int(batch["attention_mask"].sum())  # a CPU tensor: no device sync
            window_tokens += real_tokens
            window_flops += flops_model.step(real_tokens, 2 * batch["attention_mask"].shape[0],
                                             batch["attention_mask"].shape[1])
            ids = batch["input_ids"].to(acc.device)
            mask = batch["attention_mask"].to(acc.device)
            with acc.accumulate(model):
                use_bank = state["step"] >= cfg.bank_warmup_steps
                loss, z1, z2, to_push, stats = contrastive_step(
                    model, ids, mask, cfg.objective, obj_cfg, bank, hnm_gen, read_bank=use_bank, packing=packing
                )
                skip = cfg.skip_nonfinite and all_ranks_agree(not bool(torch.isfinite(loss)), acc.device)
                if skip:
                    optimizer.zero_grad(set_to_none=True)
                    message = skips.skipped(state["step"])
                    if message:
                        acc.print(message)
                    if all_ranks_agree(preempt.raised is not None, acc.device):
                        save(state["step"])
                        acc.print(f"{preempt.describe()}: checkpoint at step {state['step']} written, "
                                  f"exiting {preempt.exit_code}")
                        exit_code = preempt.exit_code
                        break
                    continue
                skips.reset()
                acc.backward(loss)
                grad_norm = None
                if acc.sync_gradients and cfg.max_grad_norm > 0:
                    grad_norm = acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if to_push is not None:
                bank.push(*to_push)
            state["micro_step"] += 1
            for k, v in stats.items():
                window_stats[k] = window_stats.get(k, 0.0) + v
            window_stats["loss"] = window_stats.get("loss", 0.0) + loss.detach()
            if not acc.sync_gradients:
                continue
            scheduler.step()
            state["step"] += 1
            window_steps += 1
            step = state["step"]
            if bar is not None:
                bar.update(1)

            if step % cfg.log_every == 0 or step == steps:
                elapsed = time.perf_counter() - window_start
                micro = window_steps * cfg.gradient_accumulation_steps
                values = {k: float(acc.reduce(v / micro, "mean")) for k, v in sorted(window_stats.items())}
                values["lr"] = scheduler.get_last_lr()[0]
                values["sentences_per_s"] = micro * cfg.batch_size * world_size / elapsed
                values["tokens_per_s"] = window_tokens * world_size / elapsed
                if peak:
                    values["mfu"] = window_flops / elapsed / peak
                values["memory_gb"] = memory_gb(acc.device)
                values["bank/fill"] = bank.fill_fraction
                values["nonfinite_skips"] = skips.total
                if grad_norm is not None:
                    values["grad_norm"] = float(grad_norm)
                if step % cfg.stats_every == 0:
                    values["emb/alignment"] = float(alignment(z1.detach(), z2.detach()))
                    values["emb/uniformity"] = float(uniformity(z1.detach()))
                values.update(world_size=world_size, global_batch=cfg.batch_size * world_size)
                log.log(step, values)
                if bar is not None:
                    bar.set_postfix(loss=f"{values['loss']:.4f}", sps=f"{values['sentences_per_s']:.0f}")
                else:  # batch logs (sbatch, nohup): one plain line per window instead of a bar
                    acc.print(progress_line(step, steps, values, (steps - step) * elapsed / window_steps))
                window_start, window_steps, window_stats = time.perf_counter(), 0, {}
                window_tokens, window_flops = 0, 0.0

            if (cfg.eval_every > 0 and step % cfg.eval_every == 0) or step == steps:
                maybe_eval(cfg, acc, model, state, log, out_dir, step)
            stop = all_ranks_agree(preempt.raised is not None, acc.device)
            if stop or (cfg.save_every > 0 and step % cfg.save_every == 0) or step == steps:
                save(step)
            if stop:
                acc.print(f"{preempt.describe()}: checkpoint at step {step} written, exiting {preempt.exit_code}")
                exit_code = preempt.exit_code
                break
            if step >= steps:
                break
            if window_steps == 0:
                window_start = time.perf_counter()  # evaluation and checkpoints are not training time
                window_tokens, window_flops = 0, 0.0

    if exit_code == 0:
        export(acc, model, out_dir / "final")
        summary = write_summary(cfg, out_dir, state, steps, world_size)
        if summary is not None:
            log.hparams(asdict(cfg), {k: summary[k] for k in ("final_loss", "best_stsb_dev", "sentences_per_s", "mfu")})
    if bar is not None:
        bar.close()
    log.close()
    acc.wait_for_everyone()
    acc.end_training()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return exit_code


class NonFiniteSkips:
    """Counts jointly skipped non-finite micro-steps; one message per window, not per step;
    raises TrainingDiverged after ``limit`` consecutive skips (0: never)."""

    def __init__(self, limit: int, window: int):
        self.limit, self.window = limit, max(1, window)
        self.consecutive = self.total = 0

    def reset(self) -> None:
        self.consecutive = 0

    def skipped(self, step: int) -> str | None:
        self.consecutive += 1
        self.total += 1
        if self.limit > 0 and self.consecutive >= self.limit:
            raise TrainingDiverged(
                f"the loss was non-finite (NaN/inf) on some rank for {self.consecutive} consecutive steps "
                f"at step {step}: training stopped, the last checkpoint is untouched. Likely causes: a learning "
                "rate far too high (SimCSE uses 1e-5..5e-5), fp16 overflow (use mixed_precision=bf16), or bad "
                "data. Fix: lower learning_rate, switch precision, or raise max_nonfinite_skips"
            )
        if self.consecutive == 1 or self.consecutive % self.window == 0:
            return (f"step {step}: non-finite loss on some rank, skipped on all ranks "
                    f"({self.consecutive} in a row, {self.total} in this run)")
        return None


def maybe_eval(cfg, acc, model, state, log, out_dir: Path, step: int) -> None:
    """STS-B dev on the main process; exports the best model (SimCSE's selection)."""
    if cfg.eval_file is None:
        return
    if cfg.deepspeed and acc.state.deepspeed_plugin.zero_stage == 3:
        # Parameters are sharded: every rank runs the same forwards so ZeRO-3's parameter
        # all-gathers match up; rank 0's score is the one used.
        score = _eval_dev(cfg, acc.unwrap_model(model))
        model.train()
    elif acc.is_main_process:
        score = _eval_dev(cfg, acc.unwrap_model(model))
        model.train()
    else:
        score = None
    from accelerate.utils import broadcast_object_list

    box = [score]
    broadcast_object_list(box)
    score = box[0]
    if score is None:
        return
    log.log(step, {STSB_DEV_KEY: score})
    acc.print(f"step {step}: STS-B dev Spearman {score:.2f}")
    if score > state["best_dev"]:
        state["best_dev"] = score
        if cfg.save_best:
            export(acc, model, out_dir / "best")


def parameter_digest(model) -> str | None:
    """sha256 of every parameter's bytes: equal on all ranks when they are in sync."""
    import hashlib

    h = hashlib.sha256()
    for p in model.parameters():
        if getattr(p, "ds_numel", None) is not None and p.numel() != p.ds_numel:
            return None  # ZeRO-3 partition: not comparable
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def export(acc, model, out_dir: Path) -> None:
    """Write an AutoModel + SentenceTransformer folder (consolidating ZeRO-3 shards)."""
    state_dict = acc.get_state_dict(model)  # a collective under ZeRO-3
    if acc.is_main_process:
        acc.unwrap_model(model).save_pretrained(out_dir, state_dict=state_dict)
    acc.wait_for_everyone()


def write_summary(cfg: TrainConfig, out_dir: Path, state: dict, steps: int, world_size: int) -> dict | None:
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    with open(out_dir / "metrics.jsonl") as f:
        records = [rec for rec in map(json.loads, f) if "sentences_per_s" in rec]
    summary = {
        "world_size": world_size,
        "global_batch": cfg.batch_size * world_size,
        "steps": steps,
        "sentences_per_s": steady_rate(records),
        "tokens_per_s": steady_rate(records, "tokens_per_s"),
        "mfu": steady_rate(records, "mfu"),
        "final_loss": records[-1]["loss"] if records else None,
        "best_stsb_dev": state["best_dev"] if math.isfinite(state["best_dev"]) else None,
        "config": asdict(cfg),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
