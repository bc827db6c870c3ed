"""GradCache: the contrastive loss of a large batch with the activation memory of a chunk.

The HNCSE loss couples every row of the global batch (all ranks' positives are negatives of
every anchor), so gradient accumulation cannot split a batch without shrinking the negatives
per row. GradCache (Gao et al., 2021; sentence-transformers' CachedMultipleNegativesRankingLoss)
splits the *encoder* work instead, in three steps:

1. ``embed_without_grad``: the 2N sequences of the local batch (both dropout views) are
   encoded in chunks of ``chunk_size`` sequences without autograd, recording the RNG state
   (CPU and, on GPU, the CUDA generator) before each chunk; the last chunk alone keeps its
   graph (``keep_last``), so it needs no second forward;
2. ``loss_with_embedding_grads``: the loss (``hncse_loss`` through ``step.contrastive_step``:
   cross-rank gather with gradient, PM, HNM, the bank) is computed once on those embeddings,
   made leaves of the graph; its backward yields d loss / d embeddings;
3. ``reforward_with_replayed_rng``: the kept chunk is backpropagated, then every other chunk
   is encoded again, with gradient, from its recorded RNG state, so every dropout mask (native
   dropout and the padding-free forward's own CPU masks, which draw from the same global
   generator) is the one the embeddings were made with, and its cached embedding gradient is
   backpropagated into the parameters.

Step 3 runs inside the backward of the loss returned by step 2 (a custom autograd node, as
reentrant activation checkpointing does), so the trainer keeps one ``accelerator.backward(loss)``
with its loss scaling, gradient accumulation and non-finite skip unchanged. Under DDP all but
the last chunk's backward run in ``no_sync``: the parameter all-reduce happens once per step,
on the summed gradient. The loss, the statistics, the negatives and the bank push are exactly
those of the uncached step; only the activation memory is bounded by the chunk.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .step import contrastive_step


@dataclass
class RngState:
    """The generators a forward draws dropout masks from: torch's CPU one and, for CUDA
    inputs, the current CUDA device's."""

    cpu: torch.Tensor
    cuda: torch.Tensor | None
    device: torch.device

    @classmethod
    def capture(cls, device: torch.device) -> "RngState":
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return cls(torch.get_rng_state(), cuda, device)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


class _ReplayOnBackward(torch.autograd.Function):
    """Identity on the cached embeddings whose backward receives d loss / d embeddings and
    hands it to ``GradCache.reforward_with_replayed_rng``."""

    @staticmethod
    def forward(ctx, emb: torch.Tensor, cache: "GradCache") -> torch.Tensor:
        ctx.cache = cache
        return emb.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.cache.reforward_with_replayed_rng(grad)
        return None, None


class GradCache:
    """One step's chunked encoding of ``model`` (an Encoder, possibly DDP-wrapped).

    ``packing_for``: the Encoder's ``packing_for`` (padding-free forward bookkeeping, built per
    chunk from the CPU mask); None uses the model's default. ``keep_last``: the last chunk is
    encoded with autograd in the first pass and its graph kept (it is backpropagated first
    instead of re-encoded: one chunk fewer to recompute, and no recomputation at all when the
    batch fits in one chunk; the peak stays one chunk's activations). ``replay_rng=False``
    re-encodes without restoring the RNG states (other dropout masks, wrong gradients: for
    tests)."""

    def __init__(self, model, chunk_size: int, packing_for=None, replay_rng: bool = True, keep_last: bool = True):
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.model = model
        self.chunk_size = chunk_size
        self.packing_for = packing_for
        self.replay_rng = replay_rng
        self.keep_last = keep_last
        self.chunks: list[tuple[slice, RngState, object]] = []
        self.kept: torch.Tensor | None = None  # the last chunk's embeddings, with their graph
        self.embedding_grad: torch.Tensor | None = None  # d loss / d embeddings, after backward

    def _forward(self, ids, mask, packing):
        return (self.model(ids, mask) if packing is None else self.model(ids, mask, packing=packing)).float()

    def _no_sync(self):
        return getattr(self.model, "no_sync", contextlib.nullcontext)()

    def embed_without_grad(self, ids: torch.Tensor, mask: torch.Tensor,
                           cpu_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Detached embeddings [rows, d] (float32) of ``ids``/``mask`` encoded in chunks
        without autograd (the last one with it, under ``keep_last``); records each chunk's
        rows, RNG state and packing for the replay. ``cpu_mask``: the same mask on the CPU, to
        build the packings without a device sync."""
        cpu_mask = mask if cpu_mask is None else cpu_mask
        starts = range(0, ids.shape[0], self.chunk_size)
        self.chunks, self.kept, out = [], None, []
        for start in starts:
            rows = slice(start, min(start + self.chunk_size, ids.shape[0]))
            packing = self.packing_for(cpu_mask[rows], ids.device) if self.packing_for else None
            state = RngState.capture(ids.device)
            if self.keep_last and rows.stop == ids.shape[0]:
                # DDP's gradient sync belongs to the last backward of the step, a replayed chunk's
                with torch.enable_grad(), (self._no_sync() if len(starts) > 1 else contextlib.nullcontext()):
                    self.kept = self._forward(ids[rows], mask[rows], packing)
                out.append(self.kept.detach())
            else:
                with torch.no_grad():
                    out.append(self._forward(ids[rows], mask[rows], packing))
            self.chunks.append((rows, state, packing))
        self.ids, self.mask = ids, mask
        return torch.cat(out)

    def loss_with_embedding_grads(self, emb: torch.Tensor, loss_fn):
        """``loss_fn(embeddings)`` on the cached ``emb``, as leaves whose gradient feeds the
        replay: backpropagating the returned loss stores d loss / d emb in ``embedding_grad``
        and then runs ``reforward_with_replayed_rng``. Returns whatever ``loss_fn`` returns."""
        leaf = emb.detach().requires_grad_()
        return loss_fn(_ReplayOnBackward.apply(leaf, self))

    def reforward_with_replayed_rng(self, grad: torch.Tensor) -> None:
        """Backpropagate ``grad`` (d loss / d embeddings) into the parameters: the kept last
        chunk through its graph first, then every other chunk encoded again with gradient from
        its recorded RNG state (the same dropout masks). Every backward but the step's last
        runs under the model's ``no_sync`` (DDP), so the gradient all-reduce happens once, on
        the sum. The RNG stream is left where it was: the replay draws nothing new."""
        self.embedding_grad = grad
        after = RngState.capture(self.ids.device)
        replay = self.chunks[:-1] if self.kept is not None else self.chunks
        with torch.enable_grad():
            if self.kept is not None:
                kept, self.kept = self.kept, None
                with self._no_sync() if replay else contextlib.nullcontext():
                    torch.autograd.backward(kept, grad[self.chunks[-1][0]].to(kept.dtype))
                del kept
            for i, (rows, state, packing) in enumerate(replay):
                if self.replay_rng:
                    state.restore()
                last = i == len(replay) - 1
                with contextlib.nullcontext() if last else self._no_sync():
                    out = self._forward(self.ids[rows], self.mask[rows], packing)
                    torch.autograd.backward(out, grad[rows].to(out.dtype))
        after.restore()


def cached_contrastive_step(model, ids, mask, loss_fn, bank=None, generator=None,
                            read_bank: bool = True, chunk_size: int = 64, packing_for=None,
                            cpu_mask: torch.Tensor | None = None, replay_rng: bool = True,
                            keep_last: bool = True, keys: torch.Tensor | None = None):
    """``step.contrastive_step`` with GradCache (``loss_fn``: an HncseLoss or an objective
    name): same arguments and returns (loss, z1, z2,
    to_push, stats), same values; the encoder runs in chunks of ``chunk_size`` sequences
    (of the 2N: each sentence is two) and ``loss.backward()`` (or ``accelerator.backward``)
    fills the parameter gradients by re-encoding the chunks with the same dropout masks."""
    cache = GradCache(model, chunk_size, packing_for=packing_for, replay_rng=replay_rng, keep_last=keep_last)
    views = (ids.repeat(2, 1), mask.repeat(2, 1))
    emb = cache.embed_without_grad(*views, cpu_mask=None if cpu_mask is None else cpu_mask.repeat(2, 1))

    def loss_on(cached):
        # contrastive_step's loss on the cached embeddings: its "model" hands them back.
        return contrastive_step(lambda *a, **k: cached, ids, mask, loss_fn, bank, generator, read_bank=read_bank,
                                keys=keys)

    return cache.loss_with_embedding_grads(emb, loss_on)
