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
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from .bank import HardNegatives
from .checkpoint import Checkpointer
from .config import ConfigError, TrainConfig, check_eval_file, startup_checks
from .encoder import Encoder, ModelSetupError, require_dropout
from .gather import all_ranks_agree, any_rank
from .hostmem import set_mmap_threshold
from .st_modules import set_resave_in_child
from .launch_env import setup_launch_env
from .lora import LoraSettings
from .metrics import (STSB_DEV_KEY, FlopsModel, MetricsLog, MetricsWindow, hparams_of, memory_gb, parse_report_to,
                      peak_flops, progress_line, release_free_memory, steady_rate)
from .gradcache import cached_contrastive_step
from .objective import HncseLoss, alignment, uniformity
from .rundir import refuse_foreign_run
from .step import contrastive_step  # noqa: F401  (also imported from here)
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
    between steps: checkpoint, then exit. A second SIGINT interrupts at once.

    One Ctrl-C in a terminal reaches a rank twice under ``--nproc-per-node``: from the
    terminal (the ranks share the launcher's process group) and forwarded by the launcher.
    A SIGINT within ``SAME_PRESS_S`` of the first is that same press, not a second one."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
    SAME_PRESS_S = 1.0

    def __init__(self) -> None:
        self.raised: int | None = None
        self._first_sigint: float | None = None
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            now = time.monotonic()
            if self._first_sigint is None:
                self._first_sigint = now
            elif now - self._first_sigint >= self.SAME_PRESS_S:
                raise KeyboardInterrupt
        self.raised = signum

    @property
    def exit_code(self) -> int:
        return INTERRUPT_EXIT_CODE if self.raised == signal.SIGINT else REQUEUE_EXIT_CODE

    def describe(self) -> str:
        return "Ctrl-C" if self.raised == signal.SIGINT else "preemption signal"


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def adopt_launcher_deepspeed(cfg: TrainConfig) -> str | None:
    """One source of truth for DeepSpeed when ``accelerate launch --config_file`` started the
    run: an Accelerate config with DeepSpeed sets ACCELERATE_USE_DEEPSPEED in the environment,
    which Accelerate would pick up behind the trainer's back (the micro-batch, ZeRO-3
    evaluation on every rank and the fp32 export would be skipped). Its DeepSpeed config file
    becomes ``cfg.deepspeed``; a DeepSpeed set up without a file, or a file other than the
    run's ``deepspeed=``, is refused. Returns a line to print when the file was adopted."""
    if not _env_true("ACCELERATE_USE_DEEPSPEED"):
        return None
    file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "").strip()
    file = None if file.lower() in ("", "none") else file
    if file is None:
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "?")
        raise ConfigError(
            f"accelerate launch set up DeepSpeed (ZeRO stage {stage}) from its own config fields, which the "
            "trainer does not read: point the accelerate config's deepspeed_config_file at a DeepSpeed JSON "
            "(ds_configs/zero2.json) or pass deepspeed=ds_configs/zero2.json and launch without DeepSpeed "
            "in the accelerate config")
    if not Path(file).is_file():
        raise ConfigError(f"accelerate launch names deepspeed_config_file={file}, which does not exist")
    if cfg.deepspeed is not None and Path(cfg.deepspeed).resolve() != Path(file).resolve():
        raise ConfigError(f"two DeepSpeed configs: deepspeed={cfg.deepspeed} and accelerate launch's "
                          f"deepspeed_config_file={file}: keep one")
    adopted = cfg.deepspeed is None
    cfg.deepspeed = file
    return f"DeepSpeed config from accelerate launch: deepspeed={file}" if adopted else None


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
        # find_unused_parameters: the one bucket layout of the whole run (config.py, ddp_fixed_buckets).
        kwargs_handlers=([pg] if expected > 1 else []) + [DistributedDataParallelKwargs(
            gradient_as_bucket_view=True, find_unused_parameters=cfg.ddp_fixed_buckets)],
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


class MicroBatch(NamedTuple):
    """One rank's micro-batch, on the device, with the host-side facts the step needs."""

    ids: torch.Tensor
    mask: torch.Tensor
    keys: torch.Tensor  # sentence_keys: token hashes, built by the data loader
    packing: object  # Encoder.packing_for(mask of both views), or None
    cpu_mask: torch.Tensor
    tokens: int  # real tokens of both views
    flops: float  # model FLOPs of the forward + backward


class StepResult(NamedTuple):
    stepped: bool  # the optimizer step was taken (False: non-finite, skipped on all ranks)
    preempted: bool  # a preemption signal reached some rank (decided jointly)
    z1: torch.Tensor | None  # the last micro-batch's views (alignment / uniformity)
    z2: torch.Tensor | None
    grad_norm: torch.Tensor | None


class Trainer:
    """HNCSE training as components: ``__init__`` sets every part up (accelerator, output
    folder, encoder, data stream, optimizer and schedule, the objective and its hard
    negatives, checkpoints, metrics), ``train_step`` takes one optimizer step, ``fit`` is the
    loop around it (log, evaluate, save, preempt), ``train(cfg)`` runs it all."""

    def __init__(self, cfg: TrainConfig):
        from accelerate.utils import set_seed
        from transformers import get_linear_schedule_with_warmup

        self.cfg = cfg.validate()
        adopted = adopt_launcher_deepspeed(cfg)  # accelerate launch --config_file with DeepSpeed
        if adopted:
            cfg.validate()
        set_mmap_threshold(malloc_threshold_mb(cfg))  # before anything large is allocated
        set_resave_in_child(resave_in_child(cfg))
        setup_launch_env()  # srun-native launch: RANK/WORLD_SIZE/... from SLURM_* (hncse_dist/launch_env.py)
        startup_checks(cfg)  # the model's config and the machine, before any weights load
        self.preempt = PreemptionFlag()
        self.acc = acc = make_accelerator(cfg)
        self.rank, self.world_size = acc.process_index, acc.num_processes
        if adopted:
            acc.print(adopted)
        self.out_dir = out_dir = Path(cfg.output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.run_id, self.run_lock = claim_output_dir(acc, out_dir)  # one run per output_dir (exit 2 otherwise)
        # ... and a fresh run never writes over another run's records (exit 2 unless resume / overwrite)
        refuse_foreign_run(out_dir, json.loads(json.dumps(asdict(cfg), default=str)), cfg.resume, cfg.overwrite,
                           is_main=acc.is_main_process)
        set_seed(cfg.seed)  # identical head initialisation on every rank
        self.encoder = self._build_encoder()
        set_seed(cfg.seed + self.rank)  # dropout masks differ per rank
        self.stream = build_stream(cfg, self.encoder.tokenizer, acc)
        self.steps = total_steps(cfg, self.stream.batches_per_epoch)
        self.flops_model = FlopsModel(self.encoder)
        self.peak = peak_flops(acc.device, cfg.mixed_precision, cfg.peak_flops)
        # The fused kernel (CPU and CUDA) is ~4x faster than the per-tensor loop on MiniLM (bench/throughput.py).
        # Only what trains (with LoRA: the adapters and the head; frozen weights get no AdamW state).
        trainable = [p for p in self.encoder.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=True)
        self.scheduler = get_linear_schedule_with_warmup(optimizer, cfg.warmup_steps, self.steps)
        self.model, self.optimizer = acc.prepare(self.encoder, optimizer)
        # DeepSpeed takes its optimizer step inside backward: non-finite losses are decided
        # before each backward there; elsewhere once per step, fused with the preemption flag.
        self.steps_in_backward = bool(cfg.deepspeed)
        # The objective and what it carries across steps: the bank and HNM's random draws.
        self.loss_fn = HncseLoss(cfg.objective_config())
        self.negatives = HardNegatives(cfg.bank_size if cfg.objective in ("hnm", "hncse") else 0, acc.device,
                                       seed=cfg.seed * 1000 + self.rank, read_after=cfg.bank_warmup_steps)
        self.state = TrainState()
        # The scheduler is stepped by hand (Accelerate's wrapper would step it once per process);
        # it travels in the trainer's own state file (plain data), not Accelerate's pickles.
        self.ckpt = Checkpointer(
            out_dir / "checkpoints", acc, keep_last=cfg.keep_last, run_id=self.run_id, save_every=cfg.save_every,
            states={"trainer": self.state, "scheduler": self.scheduler, "negatives": self.negatives,
                    "data": self.stream},
            extras={"param_digest": lambda: parameter_digest(self.model)} if cfg.param_digest else None,
        )
        self._resume()
        trackers = parse_report_to(cfg.report_to)
        if any(t != "tensorboard" for t in trackers):
            acc.init_trackers(cfg.run_name or out_dir.name, config=hparams_of(asdict(cfg)))
        self.log = MetricsLog(out_dir, acc.is_main_process, trackers, acc)
        self.bar = None  # fit's progress bar, on a terminal
        if acc.is_main_process:
            (out_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2, default=str))
        self.window = MetricsWindow(cfg.log_every, cfg.eval_every, self.steps)
        self.skips = NonFiniteSkips(cfg.max_nonfinite_skips, cfg.log_every)

    def _build_encoder(self) -> Encoder:
        cfg, acc = self.cfg, self.acc
        try:
            encoder = Encoder.from_pretrained(cfg.model_name_or_path, cfg.pooler, cfg.mlp_only_train,
                                              packed=cfg.packed_forward, dropout=cfg.dropout,
                                              append_eos=cfg.append_eos, padding_side=cfg.padding_side,
                                              lora=LoraSettings.from_config(cfg))
            dropout_warning = require_dropout(encoder, cfg.dropout)
        except ModelSetupError as err:
            raise ConfigError(str(err)) from err
        for note in encoder.notes + ([dropout_warning] if dropout_warning else []):
            acc.print(note)
        if cfg.gradient_checkpointing:
            encoder.enable_checkpointing()
        return encoder

    def _resume(self) -> None:
        cfg = self.cfg
        if not cfg.resume:
            return
        resumed = self.ckpt.resolve(cfg.resume)
        if resumed is not None:
            self.ckpt.load(resumed)  # restores the model, optimizer and every registered part
            self.acc.print(f"resumed from {resumed} at step {self.state.step}")
        elif cfg.resume != "latest":
            raise ConfigError(f"resume={cfg.resume}: no complete checkpoint there")
        if self.acc.is_main_process:  # the steps after the checkpoint are logged again
            drop_records_after(self.out_dir / "metrics.jsonl", self.state.step)

    def micro_batch(self, batch: dict) -> MicroBatch:
        """A loader batch on the device; the packing index and the FLOPs come from the CPU mask
        (no device sync), the token count and keys from the loader's worker."""
        cpu_mask = batch["attention_mask"]
        both = cpu_mask.repeat(2, 1)
        device, non_blocking = self.acc.device, self.acc.device.type == "cuda"
        tokens = 2 * batch["tokens"]
        return MicroBatch(
            ids=batch["input_ids"].to(device, non_blocking=non_blocking),
            mask=cpu_mask.to(device, non_blocking=non_blocking),
            keys=batch["sentence_keys"].to(device, non_blocking=non_blocking),
            packing=self.encoder.packing_for(both, device),
            cpu_mask=cpu_mask,
            tokens=tokens,
            flops=self.flops_model.step(tokens, both.shape[0], both.shape[1]),
        )

    def _loss(self, mb: MicroBatch, read_bank: bool):
        cfg, neg = self.cfg, self.negatives
        if cfg.cache_chunk_size:  # GradCache: same loss, activations of one chunk (gradcache.py)
            return cached_contrastive_step(
                self.model, mb.ids, mb.mask, self.loss_fn, neg.bank, neg.generator, read_bank=read_bank,
                chunk_size=cfg.cache_chunk_size, packing_for=self.encoder.packing_for, cpu_mask=mb.cpu_mask,
                keys=mb.keys)
        return contrastive_step(self.model, mb.ids, mb.mask, self.loss_fn, neg.bank, neg.generator,
                                read_bank=read_bank, packing=mb.packing, keys=mb.keys)

    def _joint(self, nonfinite: torch.Tensor | None) -> tuple[bool, bool]:
        """(non-finite on some rank, preemption on some rank): one all-reduce, one host read."""
        device = self.acc.device
        bad = nonfinite if nonfinite is not None else torch.zeros((), dtype=torch.bool, device=device)
        preempted = torch.full((), self.preempt.raised is not None, dtype=torch.bool, device=device)
        bad_any, stop = any_rank(torch.stack([bad.reshape(()), preempted]))
        return bad_any, stop

    def train_step(self, micro_batches: Sequence[MicroBatch]) -> StepResult:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches.

        Micro-step m of every rank is one global micro-batch (its negatives: that global
        micro-batch and the bank). A step whose loss is non-finite on any rank is skipped on
        every rank (``skip_nonfinite``): no update, nothing enters the bank. The bank receives
        the step's global micro-batches after the update. Device-to-host syncs: one per step
        (the joint non-finite / preemption decision), plus one per micro-step under DeepSpeed."""
        cfg, acc, model, optimizer = self.cfg, self.acc, self.model, self.optimizer
        read_bank = self.negatives.readable(self.state.step)
        nonfinite, pushes, added = None, [], []
        z1 = z2 = grad_norm = None
        stepped, stop = True, False
        for mb in micro_batches:
            with acc.accumulate(model):
                loss, z1, z2, to_push, stats = self._loss(mb, read_bank)
                if self.steps_in_backward:
                    bad, stop = self._joint(~torch.isfinite(loss.detach()) if cfg.skip_nonfinite else None)
                    if bad:  # decided before DeepSpeed's backward, which steps its optimizer
                        optimizer.zero_grad(set_to_none=True)
                        stepped = not acc.sync_gradients and stepped
                        if acc.sync_gradients:
                            break
                        continue
                elif cfg.skip_nonfinite:
                    flag = ~torch.isfinite(loss.detach())
                    nonfinite = flag if nonfinite is None else nonfinite | flag
                acc.backward(loss)
                if acc.sync_gradients:
                    if cfg.max_grad_norm > 0:
                        grad_norm = acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                        if nonfinite is not None and grad_norm is not None:  # identical on all ranks
                            nonfinite = nonfinite | ~torch.isfinite(grad_norm.detach())
                    if not self.steps_in_backward:
                        bad, stop = self._joint(nonfinite)
                        stepped = not bad
                    if stepped:
                        optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            if to_push is not None:
                pushes.append(to_push)
            added.append((loss, stats, mb))
        if not stepped and not self.steps_in_backward:
            pushes, added = [], []  # a skipped step leaves no trace in the bank or the metrics
        for z, keys in pushes:
            self.negatives.push(z, keys)
        for loss, stats, mb in added:
            self.window.add(loss, stats, mb.tokens, mb.flops)
        if stepped:
            self.scheduler.step()
            self.state.step += 1
            self.window.steps += 1
        return StepResult(stepped, stop, z1, z2, grad_norm)

    def _micro_batches(self) -> Iterator[list[MicroBatch]]:
        """Groups of ``gradient_accumulation_steps`` micro-batches, epoch after epoch."""
        group: list[MicroBatch] = []
        while True:
            for batch in self.stream:
                group.append(self.micro_batch(batch))
                if len(group) == self.cfg.gradient_accumulation_steps:
                    yield group
                    group = []

    def _log_window(self, result: StepResult) -> None:
        cfg, acc, step = self.cfg, self.acc, self.state.step
        values = self.window.values(acc, cfg.batch_size * self.world_size, self.peak)
        values["lr"] = self.scheduler.get_last_lr()[0]
        values["memory_gb"] = memory_gb(acc.device)
        values["bank/fill"] = self.negatives.bank.fill_fraction
        values["nonfinite_skips"] = self.skips.total
        if result.grad_norm is not None:
            values["grad_norm"] = float(result.grad_norm)
        if step % cfg.stats_every == 0 and result.z1 is not None:
            values["emb/alignment"] = float(alignment(result.z1.detach(), result.z2.detach()))
            values["emb/uniformity"] = float(uniformity(result.z1.detach()))
        values.update(world_size=self.world_size, global_batch=cfg.batch_size * self.world_size)
        self.log.log(step, values)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{values['loss']:.4f}", sps=f"{values['sentences_per_s']:.0f}")
        else:  # batch logs (sbatch, nohup): one plain line per window instead of a bar
            acc.print(progress_line(step, self.steps, values, self.window.eta_s(step)))
        if acc.device.type == "cpu":
            release_free_memory()  # a flat memory curve over long CPU runs
        self.window.reset()

    def _checkpoint_and_exit(self, step: int) -> int:
        self.ckpt.save(step)
        self.acc.print(f"{self.preempt.describe()}: checkpoint at step {step} written, "
                       f"exiting {self.preempt.exit_code}")
        return self.preempt.exit_code

    def fit(self) -> int:
        """The loop: returns the process exit code (0, or the preemption's exit code)."""
        cfg, acc = self.cfg, self.acc
        acc.print(f"world size {self.world_size} | global batch {cfg.batch_size * self.world_size} | "
                  f"{self.steps} steps | objective {cfg.objective} | device {acc.device}")
        if cfg.cache_chunk_size:
            acc.print(f"GradCache: each rank's {2 * cfg.batch_size} sequences are encoded in chunks of "
                      f"{cfg.cache_chunk_size}")
        if cfg.progress and acc.is_main_process and sys.stderr.isatty():  # no bar spam in batch logs
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.steps, initial=self.state.step, desc="train", unit="step", dynamic_ncols=True)
        exit_code = 0
        self.window.reset()
        self.model.train()
        groups = self._micro_batches()
        while self.state.step < self.steps:
            result = self.train_step(next(groups))
            step = self.state.step
            if not result.stepped:
                message = self.skips.skipped(step)  # raises TrainingDiverged after too many
                if message:
                    acc.print(message)
                if result.preempted or all_ranks_agree(self.preempt.raised is not None, acc.device):
                    exit_code = self._checkpoint_and_exit(step)
                    break
                continue
            self.skips.reset()
            if self.bar is not None:
                self.bar.update(1)
            if self.window.log_due(step):
                self._log_window(result)
            if self.window.eval_due(step):
                maybe_eval(cfg, acc, self.model, self.state, self.log, self.out_dir, step, save=self.ckpt.save,
                           card=self.card())
            # Decided again here, before the next batch is fetched: a signal that came during
            # the step's end or the evaluation is acted on now (Slurm signals the DataLoader
            # workers too, and the next fetch would find them gone).
            if result.preempted or all_ranks_agree(self.preempt.raised is not None, acc.device):
                exit_code = self._checkpoint_and_exit(step)
                break
            if self.ckpt.due(step, self.steps):
                self.ckpt.save(step)
            self.window.restart_clock()  # evaluation and checkpoints are not training time
        groups.close()
        if exit_code == 0:
            export(acc, self.model, self.out_dir / "final", cfg.export_dtype, card=self.card())
            summary = write_summary(cfg, self.out_dir, self.state, self.steps, self.world_size)
            if summary is not None:
                self.log.hparams(asdict(cfg), {k: summary[k] for k in ("final_loss", "best_stsb_dev", "sentences_per_s", "mfu")})
        self.close()
        return exit_code

    def card(self) -> dict:
        """What the exported model card states: the run's config, world size, step, best STS-B
        dev score and the command (hncse_dist.model_card)."""
        from .model_card import command_line

        best = self.state.best_dev
        return {"config": json.loads(json.dumps(asdict(self.cfg), default=str)), "world_size": self.world_size,
                "step": self.state.step, "best_stsb_dev": best if math.isfinite(best) else None,
                "command": command_line()}

    def close_outputs(self) -> None:
        """The progress bar and the metrics (jsonl, TensorBoard) closed: what was logged is on disk."""
        if self.bar is not None:
            self.bar.close()
        self.log.close()

    def close(self) -> None:
        self.close_outputs()
        self.acc.wait_for_everyone()
        self.acc.end_training()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        if self.run_lock is not None:
            self.run_lock.release()


def malloc_threshold_mb(cfg: TrainConfig) -> float:
    """``malloc_mmap_threshold_mb``, its auto value resolved: 1 MiB under DeepSpeed, else 0."""
    if cfg.malloc_mmap_threshold_mb is not None:
        return cfg.malloc_mmap_threshold_mb
    return 1.0 if cfg.deepspeed else 0.0


def resave_in_child(cfg: TrainConfig) -> bool:
    """``export_st_resave``, its auto value resolved: a child process under DeepSpeed."""
    return cfg.export_st_resave == "child" or (cfg.export_st_resave == "auto" and bool(cfg.deepspeed))


def train(cfg: TrainConfig) -> int:
    """Run training; returns the process exit code (0, or REQUEUE_EXIT_CODE after preemption).
    A run that fails still has what it logged on disk (the CLI's ranks leave without the
    interpreter's teardown, which would otherwise flush it)."""
    trainer = Trainer(cfg)
    try:
        return trainer.fit()
    except BaseException:
        trainer.close_outputs()
        raise


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


def maybe_eval(cfg, acc, model, state, log, out_dir: Path, step: int, save=None, card: dict | None = None) -> None:
    """STS-B dev on the main process; exports the best model (SimCSE's selection) with
    ``card`` (the run's model-card facts) and this step's score.

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
            best_card = {**card, "step": step, "stsb_dev": score, "best_stsb_dev": score} if card else None
            export(acc, model, out_dir / "best", cfg.export_dtype, card=best_card)


def parameter_digest(model) -> str | None:
    """sha256 of every parameter's bytes: equal on all ranks when they are in sync."""
    import hashlib

    h = hashlib.sha256()
    for p in model.parameters():
        if getattr(p, "ds_numel", None) is not None and p.numel() != p.ds_numel:
            return None  # ZeRO-3 partition: not comparable
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def export(acc, model, out_dir: Path, dtype: str = "fp32", card: dict | None = None) -> None:
    """Write an AutoModel + SentenceTransformer folder in ``dtype`` from the fp32 (master)
    weights, consolidating ZeRO partitions (a collective: every rank calls it), with a model
    card from ``card``. A LoRA run writes its adapter merged into plain weights (or its
    adapter folder: ``lora_export``)."""
    from .export import export_trained

    export_trained(acc, model, out_dir, dtype, card=card)


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
