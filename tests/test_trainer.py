"""The Trainer's step, in-process on one CPU process: gradient accumulation equals the
hand-written update, a non-finite step leaves no trace, and a step syncs the host once."""

from __future__ import annotations

import copy
import signal

import pytest
import torch

import hncse_dist.train
from torch.utils._python_dispatch import TorchDispatchMode

from hncse_dist.bank import NegativeBank
from hncse_dist.config import ConfigError, TrainConfig
from hncse_dist.objective import HncseLoss
from hncse_dist.train import Trainer, contrastive_step


@pytest.fixture
def make_trainer(tmp_path, tiny_bert, corpus, monkeypatch):
    """A Trainer on one process; the process's signal handlers and process group are restored after."""
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "256")
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    made = []

    def make(**kw):
        args = dict(model_name_or_path=tiny_bert, train_file=corpus, output_dir=str(tmp_path / f"run{len(made)}"),
                    batch_size=4, gradient_accumulation_steps=2, max_steps=4, objective="hncse", bank_size=2,
                    hnm_k=4, hnm_m=4, dropout=0.0, learning_rate=1e-3, warmup_steps=0, max_grad_norm=1.0,
                    num_workers=0, eval_file=None, save_every=0, log_every=100, progress=False)
        args.update(kw)
        trainer = Trainer(TrainConfig(**args))
        made.append(trainer)
        return trainer

    yield make
    for trainer in made:
        trainer.log.close()
        if trainer.run_lock is not None:
            trainer.run_lock.release()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    for s, handler in saved.items():
        signal.signal(s, handler)


def _params(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_accumulated_step_equals_the_hand_written_update(make_trainer):
    trainer = make_trainer()
    group = next(trainer._micro_batches())
    assert len(group) == 2

    # The reference: the same model, loss of each global micro-batch / k, clipped gradients.
    ref = copy.deepcopy(trainer.encoder)
    loss_fn = HncseLoss(trainer.cfg.objective_config())
    total = 0.0
    pushed = []
    draws = torch.Generator().set_state(trainer.negatives.generator.get_state())  # HNM's random mixing
    for mb in group:
        loss, _, z2, _, _ = contrastive_step(ref, mb.ids, mb.mask, loss_fn, NegativeBank(2), draws, packing=mb.packing)
        (loss / 2).backward()
        total += float(loss.detach()) / 2
        pushed.append(z2.detach())
    torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)

    seen = []  # the gradients the trainer's optimizer steps with
    step = trainer.optimizer.step

    def recording_step(*args, **kwargs):
        seen.extend(p.grad.detach().clone() for p in trainer.encoder.parameters())
        return step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    before = _params(trainer.encoder)
    result = trainer.train_step(group)
    assert result.stepped and not result.preempted
    assert trainer.state.step == 1 and trainer.scheduler.last_epoch == 1
    assert len(seen) == len(before)
    scale = max(float(p.grad.abs().max()) for p in ref.parameters())
    for got, want in zip(seen, ref.parameters()):
        torch.testing.assert_close(got, want.grad, atol=1e-6 * scale, rtol=1e-5)
    # ... and the update is AdamW's first step: lr x sign(gradient) where the gradient is clear
    for b, a, g in zip(before, _params(trainer.encoder), seen):
        clear = g.abs() > 1e-3 * scale
        torch.testing.assert_close((b - a)[clear], 1e-3 * g.sign()[clear], atol=1e-5, rtol=0)
    # the window averaged the two micro-steps' losses
    assert trainer.window.micro == 2 and trainer.window.steps == 1
    assert abs(float(trainer.window.sums["loss"]) / 2 - total) < 1e-5
    # both global micro-batches entered the bank after the update, in order
    bank_z, _ = trainer.negatives.bank.contents()
    assert trainer.negatives.bank.filled == 2
    torch.testing.assert_close(bank_z, torch.cat(pushed), atol=1e-5, rtol=0)


def test_a_non_finite_micro_step_skips_the_whole_step(make_trainer):
    trainer = make_trainer()
    group = next(trainer._micro_batches())
    real = trainer.loss_fn
    calls = []

    def second_is_nan(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(1)
        return out._replace(loss=out.loss * float("nan")) if len(calls) == 2 else out

    second_is_nan.config = real.config
    trainer.loss_fn = second_is_nan
    before = _params(trainer.encoder)
    result = trainer.train_step(group)
    assert not result.stepped
    assert trainer.state.step == 0 and trainer.scheduler.last_epoch == 0
    assert all(torch.equal(a, b) for a, b in zip(_params(trainer.encoder), before))
    assert trainer.negatives.bank.filled == 0 and trainer.window.micro == 0
    assert all(p.grad is None for p in trainer.encoder.parameters())
    # the next (finite) step proceeds normally
    trainer.loss_fn = real
    assert trainer.train_step(next(trainer._micro_batches())).stepped and trainer.state.step == 1


class _HostSyncs(TorchDispatchMode):
    """Counts the operators that make a GPU wait for the host to read a value."""

    SYNCING = ("aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::unique")

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in self.SYNCING or "item" in name:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("objective", ["simcse", "hncse"])
def test_a_training_step_reads_the_device_once(make_trainer, objective):
    """Per optimizer step (2 micro-steps here), the only device-to-host read is the joint
    non-finite / preemption decision: nothing per micro-step, nothing in the objective."""
    trainer = make_trainer(objective=objective)
    groups = trainer._micro_batches()
    trainer.train_step(next(groups))  # the bank fills: the next step reads it
    group = next(groups)
    with _HostSyncs() as syncs:
        result = trainer.train_step(group)
    assert result.stepped
    assert len(syncs.seen) == 1, syncs.seen


def test_one_ctrl_c_delivered_twice_is_one_press(monkeypatch):
    """Under --nproc-per-node a terminal's Ctrl-C reaches a rank from the process group and
    from the launcher: that is one press (checkpoint, exit 130); a press a second later is a
    second one (interrupt at once)."""
    import hncse_dist.train as train

    saved = {s: signal.getsignal(s) for s in train.PreemptionFlag.SIGNALS}
    try:
        clock = [100.0]
        monkeypatch.setattr(train.time, "monotonic", lambda: clock[0])
        flag = train.PreemptionFlag()
        flag._handle(signal.SIGINT, None)
        clock[0] += 0.01
        flag._handle(signal.SIGINT, None)  # the forwarded copy of the same press
        assert flag.raised == signal.SIGINT and flag.exit_code == 130
        clock[0] += 1.5
        with pytest.raises(KeyboardInterrupt):
            flag._handle(signal.SIGINT, None)
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


def test_the_trainer_sets_the_configured_malloc_threshold(make_trainer, monkeypatch):
    calls = []
    monkeypatch.setattr(hncse_dist.train, "set_mmap_threshold", lambda mb: calls.append(mb))
    make_trainer(malloc_mmap_threshold_mb=2.5)
    make_trainer(malloc_mmap_threshold_mb=0)
    make_trainer()  # auto, without DeepSpeed: glibc's default
    assert calls == [2.5, 0, 0]
    assert hncse_dist.train.malloc_threshold_mb(TrainConfig(deepspeed="ds_configs/zero3.json")) == 1.0


def test_the_trainer_sets_where_exports_are_re_saved(make_trainer, monkeypatch):
    calls = []
    monkeypatch.setattr(hncse_dist.train, "set_resave_in_child", lambda flag: calls.append(flag))
    make_trainer(export_st_resave="child")
    make_trainer(export_st_resave="here")
    make_trainer()  # auto, without DeepSpeed: here
    assert calls == [True, False, False]
    assert hncse_dist.train.resave_in_child(TrainConfig(deepspeed="ds_configs/zero3.json"))
    with pytest.raises(ConfigError, match="export_st_resave='elsewhere': use one of auto, child, here"):
        TrainConfig(export_st_resave="elsewhere").validate()
