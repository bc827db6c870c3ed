"""The loss of one (micro-)batch as the trainer computes it: one forward over both dropout
views, then the HNCSE objective across ranks with the negative bank. Shared by the trainer,
GradCache and the benchmarks."""

from __future__ import annotations

import torch

from .bank import NegativeBank, sentence_keys
from .objective import HncseLoss, ObjectiveConfig


def contrastive_step(model, ids, mask, loss_fn: HncseLoss | str, bank: NegativeBank | None = None,
                     generator: torch.Generator | None = None, read_bank: bool = True, packing=None,
                     keys: torch.Tensor | None = None):
    """Loss of one (micro-)batch: ONE forward over both dropout views (2N sequences), then
    the objective across ranks. ``bank`` is read as HNM candidates if ``read_bank`` (False
    during its warm-up). Returns (loss, z1, z2, to_push, stats): ``to_push`` is the global
    batch's detached (z2, sentence keys) that the loss gathered, for ``bank.push`` after the
    step (None when there is no bank), so filling the bank costs no communication.
    ``packing``: ``Encoder.packing_for`` of ``mask.repeat(2, 1)``, built before the transfer.
    ``keys``: the rows' ``sentence_keys`` when the data loader built them (else computed here)."""
    if isinstance(loss_fn, str):  # an objective name with the default options
        loss_fn = HncseLoss(ObjectiveConfig(objective=loss_fn))
    views = (ids.repeat(2, 1), mask.repeat(2, 1))
    emb = (model(*views) if packing is None else model(*views, packing=packing)).float()
    z1, z2 = emb.chunk(2)
    has_bank = bank is not None and bank.batches > 0
    cfg = loss_fn.config
    masks_duplicates = cfg.objective in ("hnm", "hncse") and cfg.hnm_mask_duplicates
    if not (has_bank or masks_duplicates):
        keys = None  # gathered only when used
    elif keys is None:
        keys = sentence_keys(ids, mask)
    bank_z, bank_k = bank.contents() if has_bank and read_bank else (None, None)
    out = loss_fn(z1, z2, bank_z, keys=keys, bank_keys=bank_k, generator=generator)
    to_push = (out.z2_global, out.keys_global) if has_bank else None
    return out.loss, z1, z2, to_push, out.stats
