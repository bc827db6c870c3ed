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
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .bank import NegativeBank, sentence_keys
from .checkpoint import Checkpointer
from .config import ConfigError, TrainConfig, check_eval_file, startup_checks
from .encoder import Encoder, ModelSetupError, require_dropout
from .gather import all_ranks_agree
from .launch_env import setup_launch_env
from .metrics import (STSB_DEV_KEY, FlopsModel, MetricsLog, hparams_of, memory_gb, parse_report_to, peak_flops,
                      progress_line, release_free_memory, steady_rate)
from .gradcache import cached_contrastive_step
from .objective import HncseLoss, ObjectiveConfig, alignment, uniformity
from .rundir import refuse_foreign_run
from .runlock import claim_output_dir, drop_records_after

REQUEUE_EXIT_CODE = 75  # "checkpointed after a preemption signal: requeue me" (EX_TEMPFAIL)
INTERRUPT_EXIT_CODE = 130  # checkpointed after Ctrl-C (the shell's code for SIGINT)
PACKAGED_STSB_DEV = Path(__file__).parent / "resources" / "sts-dev.csv"


@dataclass
class TrainState:
    """What the loop itself carries across a checkpoint."""

    step: int = 0  # optimizer steps taken
    best_dev: float = float("-inf")  # best STS-B dev Spearman so far (selects best/)

    def state_dict(self) -> dict:
        return {"step": self.step, "best_dev": self.best_dev}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.best_dev = int(state["step"]), float(state["best_dev"])


class TrainingDiverged(RuntimeError):
    """The loss stayed non-finite: stopping is better than skipping forever."""


class EvalFailed(RuntimeError):
    """STS-B dev evaluation failed mid-run; the training state was checkpointed first."""


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
    pg = InitProcessGroupKwargs(backend="nccl" if on_gpu else "gloo", timeout=timedelta(minutes=cfg.dist_timeout_minutes))
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


def contrastive_step(model, ids, mask, loss_fn: HncseLoss | str, bank: NegativeBank | None = None,
                     generator: torch.Generator | None = None, read_bank: bool = True, packing=None):
    """Loss of one (micro-)batch: ONE forward over both dropout views (2N sequences), then
    the objective across ranks. ``bank`` is read as HNM candidates if ``read_bank`` (False
    during its warm-up). Returns (loss, z1, z2, to_push, stats): ``to_push`` is the global
    batch's detached (z2, sentence keys) that the loss gathered, for ``bank.push`` after the
    step (None when there is no bank), so filling the bank costs no communication.
    ``packing``: ``Encoder.packing_for`` of ``mask.repeat(2, 1)``, built before the transfer."""
    if isinstance(loss_fn, str):  # an objective name with the default options
        loss_fn = HncseLoss(ObjectiveConfig(objective=loss_fn))
    views = (ids.repeat(2, 1), mask.repeat(2, 1))
    emb = (model(*views) if packing is None else model(*views, packing=packing)).float()
    z1, z2 = emb.chunk(2)
    has_bank = bank is not None and bank.batches > 0
    cfg = loss_fn.config
    masks_duplicates = cfg.objective in ("hnm", "hncse") and cfg.hnm_mask_duplicates
    keys = sentence_keys(ids, mask) if has_bank or masks_duplicates else None  # gathered only when used
    bank_z, bank_k = bank.contents() if has_bank and read_bank else (None, None)
    out = loss_fn(z1, z2, bank_z, keys=keys, bank_keys=bank_k, generator=generator)
    to_push = (out.z2_global, out.keys_global) if has_bank else None
    return out.loss, z1, z2, to_push, out.stats


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
            worker_start="forkserver",  # workers must not inherit the model (see ShardStream)
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
    try:
        return dev_spearman(encoder, str(path), batch_size=cfg.eval_batch_size)
    except (OSError, ValueError, IndexError):
        check_eval_file(cfg.eval_file)  # a file that went bad since start-up: say what is wrong with it
        raise


def train(cfg: TrainConfig) -> int:
    """Run training; returns the process exit code (0, or REQUEUE_EXIT_CODE after preemption)."""
    from accelerate.utils import set_seed
    from transformers import get_linear_schedule_with_warmup

    cfg.validate()
    setup_launch_env()  # srun-native launch: RANK/WORLD_SIZE/... from SLURM_* (hncse_dist/launch_env.py)
    startup_checks(cfg)  # the model's config and the machine, before any weights load
    preempt = PreemptionFlag()
    acc = make_accelerator(cfg)
    rank, world_size = acc.process_index, acc.num_processes
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run_id, run_lock = claim_output_dir(acc, out_dir)  # one run per output_dir (exit 2 otherwise)
    # ... and a fresh run never writes over another run's records (exit 2 unless resume / overwrite)
    refuse_foreign_run(out_dir, json.loads(json.dumps(asdict(cfg), default=str)), cfg.resume, cfg.overwrite,
                       is_main=acc.is_main_process)
    set_seed(cfg.seed)  # identical head initialisation on every rank
    try:
        encoder = Encoder.from_pretrained(cfg.model_name_or_path, cfg.pooler, cfg.mlp_only_train,
                                          packed=cfg.packed_forward, dropout=cfg.dropout,
                                          append_eos=cfg.append_eos, padding_side=cfg.padding_side)
        dropout_warning = require_dropout(encoder, cfg.dropout)
    except ModelSetupError as err:
        raise ConfigError(str(err)) from err
    for note in encoder.notes + ([dropout_warning] if dropout_warning else []):
        acc.print(note)
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
    # Its state travels in the trainer's own state file (plain data), not Accelerate's pickles.
    bank = NegativeBank(cfg.bank_size if cfg.objective in ("hnm", "hncse") else 0)
    hnm_gen = torch.Generator(device=acc.device).manual_seed(cfg.seed * 1000 + rank)
    ckpt = Checkpointer(out_dir / "checkpoints", acc, keep_last=cfg.keep_last, run_id=run_id)

    state = TrainState()
    if cfg.resume:
        resumed = ckpt.resolve(cfg.resume)
        if resumed is not None:
            extra = ckpt.load(resumed)
            state.load_state_dict(extra["trainer"])
            scheduler.load_state_dict(extra["scheduler"])
            bank.load_state_dict(extra["bank"], device=acc.device)
            stream.load_state_dict(extra["data"])
            hnm_gen.set_state(extra["generator"])
            acc.print(f"resumed from {resumed} at step {state.step}")
        elif cfg.resume != "latest":
            raise ConfigError(f"resume={cfg.resume}: no complete checkpoint there")
        if acc.is_main_process:  # the steps after the checkpoint are logged again
            drop_records_after(out_dir / "metrics.jsonl", state.step)

    def save(tag_step: int) -> Path:
        return ckpt.save(tag_step, {"trainer": state.state_dict(), "scheduler": scheduler.state_dict(), "bank": bank.state_dict(),
                                    "data": stream.state_dict(), "generator": hnm_gen.get_state(),
                                    "param_digest": parameter_digest(model)})

    trackers = parse_report_to(cfg.report_to)
    if any(t != "tensorboard" for t in trackers):
        acc.init_trackers(cfg.run_name or out_dir.name, config=hparams_of(asdict(cfg)))
    log = MetricsLog(out_dir, acc.is_main_process, trackers, acc)
    if acc.is_main_process:
        (out_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2, default=str))
    acc.print(f"world size {world_size} | global batch {cfg.batch_size * world_size} | "
              f"{steps} steps | objective {cfg.objective} | device {acc.device}")
    loss_fn = HncseLoss(cfg.objective_config())
    if cfg.cache_chunk_size:
        acc.print(f"GradCache: each rank's {2 * cfg.batch_size} sequences are encoded in chunks of {cfg.cache_chunk_size}")
    bar = None
    if cfg.progress and acc.is_main_process and sys.stderr.isatty():  # no bar spam in batch logs
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=state.step, desc="train", unit="step", dynamic_ncols=True)

    exit_code = 0
    window_start, window_steps, window_stats = time.perf_counter(), 0, {}
    window_tokens, window_flops = 0, 0.0
    skips = NonFiniteSkips(cfg.max_nonfinite_skips, cfg.log_every)
    model.train()
    while state.step < steps and exit_code == 0:
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
                use_bank = state.step >= cfg.bank_warmup_steps
                if cfg.cache_chunk_size:  # GradCache: same loss, activations of one chunk (gradcache.py)
                    loss, z1, z2, to_push, stats = cached_contrastive_step(
                        model, ids, mask, loss_fn, bank, hnm_gen, read_bank=use_bank,
                        chunk_size=cfg.cache_chunk_size, packing_for=encoder.packing_for,
                        cpu_mask=batch["attention_mask"])
                else:
                    loss, z1, z2, to_push, stats = contrastive_step(
                        model, ids, mask, loss_fn, bank, hnm_gen, read_bank=use_bank, packing=packing
                    )
                skip = cfg.skip_nonfinite and all_ranks_agree(not bool(torch.isfinite(loss)), acc.device)
                if skip:
                    optimizer.zero_grad(set_to_none=True)
                    message = skips.skipped(state.step)
                    if message:
                        acc.print(message)
                    if all_ranks_agree(preempt.raised is not None, acc.device):
                        save(state.step)
                        acc.print(f"{preempt.describe()}: checkpoint at step {state.step} written, "
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
            for k, v in stats.items():
                window_stats[k] = window_stats.get(k, 0.0) + v
            window_stats["loss"] = window_stats.get("loss", 0.0) + loss.detach()
            if not acc.sync_gradients:
                continue
            scheduler.step()
            state.step += 1
            window_steps += 1
            step = state.step
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
                if acc.device.type == "cpu":
                    release_free_memory()  # a flat memory curve over long CPU runs
                window_start, window_steps, window_stats = time.perf_counter(), 0, {}
                window_tokens, window_flops = 0, 0.0

            if (cfg.eval_every > 0 and step % cfg.eval_every == 0) or step == steps:
                maybe_eval(cfg, acc, model, state, log, out_dir, step, save=save)
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
        export(acc, model, out_dir / "final", cfg.export_dtype)
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
    if run_lock is not None:
        run_lock.release()
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


def maybe_eval(cfg, acc, model, state, log, out_dir: Path, step: int, save=None) -> None:
    """STS-B dev on the main process; exports the best model (SimCSE's selection).

    An evaluation that fails never loses the run: every rank learns of it, ``save(step)``
    writes a checkpoint, then EvalFailed is raised on every rank."""
    if cfg.eval_file is None:
        return
    score, error = None, None
    try:
        if cfg.deepspeed and acc.state.deepspeed_plugin.zero_stage == 3:
            # Parameters are sharded: every rank runs the same forwards so ZeRO-3's parameter
            # all-gathers match up; rank 0's score is the one used.
            score = _eval_dev(cfg, acc.unwrap_model(model))
        elif acc.is_main_process:
            score = _eval_dev(cfg, acc.unwrap_model(model))
    except Exception as err:  # noqa: BLE001 - whatever broke, the training state is saved first
        lines = str(err).strip().splitlines()
        error = f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
    finally:
        model.train()
    from accelerate.utils import broadcast_object_list

    box = [score, error]
    broadcast_object_list(box)
    score, first_error = box
    if all_ranks_agree(error is not None, acc.device):  # under ZeRO-3 any rank may fail
        where = save(step) if save is not None else None
        kept = f"the training state is saved in {where}" if where is not None else "no checkpoint was written"
        raise EvalFailed(f"evaluation at step {step} failed ({first_error or error or 'on another rank'}); {kept}: "
                         "fix the cause (or set eval_file=null) and continue with resume=latest")
    if score is None:
        return
    log.log(step, {STSB_DEV_KEY: score})
    acc.print(f"step {step}: STS-B dev Spearman {score:.2f}")
    if score > state.best_dev:
        state.best_dev = score
        if cfg.save_best:
            export(acc, model, out_dir / "best", cfg.export_dtype)


def parameter_digest(model) -> str | None:
    """sha256 of every parameter's bytes: equal on all ranks when they are in sync."""
    import hashlib

    h = hashlib.sha256()
    for p in model.parameters():
        if getattr(p, "ds_numel", None) is not None and p.numel() != p.ds_numel:
            return None  # ZeRO-3 partition: not comparable
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def export(acc, model, out_dir: Path, dtype: str = "fp32") -> None:
    """Write an AutoModel + SentenceTransformer folder in ``dtype`` from the fp32 (master)
    weights, consolidating ZeRO partitions (a collective: every rank calls it)."""
    from .export import export_from_training

    export_from_training(acc, model, out_dir, dtype)


def write_summary(cfg: TrainConfig, out_dir: Path, state: TrainState, steps: int, world_size: int) -> dict | None:
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
        "best_stsb_dev": state.best_dev if math.isfinite(state.best_dev) else None,
        "config": asdict(cfg),
    }
    from .launch_env import run_topology

    summary.update(run_topology(world_size))  # nodes, procs_per_node, device
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
