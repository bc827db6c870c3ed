"""Padding-free forward of BERT-family encoders (BERT, RoBERTa, XLM-R, CamemBERT).

Every token-wise part of a layer (the Q/K/V, output and feed-forward matmuls, GELU, dropout,
LayerNorm, residuals) runs on the packed [tokens, hidden] matrix of the REAL tokens only;
only the attention product itself, small at sentence lengths, is done on the padded
[batch, heads, L, L] layout. On sentence batches about a quarter of the padded positions are
padding (Wikipedia sentences cut at 32 tokens: 22%), so this removes that much of the model
FLOPs from every step. Numerically it is the Hugging Face forward (same modules, same weights,
called in the same order: tested to 1e-5 with the poolers and gradients); dropout draws differ
in layout only. The leaf modules are called (never their weights read directly), so
DeepSpeed ZeRO-3's parameter-gathering hooks and gradient checkpointing keep working.

Without autograd (evaluation: ``Encoder.encode`` runs under ``torch.no_grad``), float32 on a
CPU, the plain linear layers run through oneDNN's matmul, the erf GELU fused into the first
feed-forward one (``fast_inference``): on the AMD EPYC this was measured on, MKL's sgemm (what
``F.linear`` calls) ran the same shapes at less than half the speed.

Anything else (other architectures, decoders, relative position embeddings, left padding)
takes the model's own forward: ``supports_packing`` decides.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

PACKED_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "camembert")


def supports_packing(backbone: nn.Module) -> bool:
    """True when ``packed_forward`` reproduces this backbone's forward."""
    cfg = getattr(backbone, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) not in PACKED_MODEL_TYPES:
        return False
    if getattr(cfg, "is_decoder", False) or getattr(cfg, "add_cross_attention", False):
        return False
    if getattr(cfg, "position_embedding_type", "absolute") != "absolute":
        return False
    if getattr(cfg, "chunk_size_feed_forward", 0):
        return False
    if getattr(cfg, "_attn_implementation", "eager") not in ("eager", "sdpa", None):
        return False
    try:
        layer = backbone.encoder.layer[0]
        parts = (layer.attention.self.query, layer.attention.self.key, layer.attention.self.value,
                 layer.attention.output.dense, layer.attention.output.LayerNorm, layer.intermediate.dense,
                 layer.output.dense, layer.output.LayerNorm)
        backbone.embeddings  # noqa: B018
    except (AttributeError, IndexError):
        return False
    return all(isinstance(p, (nn.Linear, nn.LayerNorm)) or _adapted_linear(p) for p in parts)


def _adapted_linear(module: nn.Module) -> bool:
    """A linear layer wrapped by an adapter (peft's LoRA: ``base_layer`` + its own forward)."""
    return isinstance(getattr(module, "base_layer", None), nn.Linear)


def right_padded(mask: torch.Tensor) -> bool:
    """Every row is real tokens then padding (what tokenizers produce with padding_side=right)."""
    lengths = mask.sum(1, keepdim=True)
    return bool((mask.bool() == (torch.arange(mask.shape[1], device=mask.device) < lengths)).all())


class Packing:
    """Index bookkeeping between the padded [B, L] layout and the packed [T] one."""

    def __init__(self, mask: torch.Tensor):
        self.batch, self.length = mask.shape
        flat = mask.reshape(-1).bool()
        self.index = flat.nonzero().squeeze(1)  # packed position -> padded position
        self.lengths = mask.sum(1)
        self.row = self.index // self.length  # packed position -> sequence
        self.starts = torch.cumsum(self.lengths, 0) - self.lengths  # first token of each sequence
        self.key_mask = mask.bool()[:, None, None, :]  # SDPA: True = attend

    def to(self, device: torch.device | str) -> "Packing":
        """The same packing on ``device``. Built from the CPU mask before the batch moves to a
        GPU, it keeps ``nonzero`` and the padding check off the GPU: no host sync in the step."""
        for name in ("index", "lengths", "row", "starts", "key_mask"):
            setattr(self, name, getattr(self, name).to(device, non_blocking=True))
        return self

    def pack(self, padded: torch.Tensor) -> torch.Tensor:
        return padded.reshape(self.batch * self.length, -1).index_select(0, self.index)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        out = packed.new_zeros((self.batch * self.length, packed.shape[-1]))
        return out.index_copy(0, self.index, packed).view(self.batch, self.length, -1)

    def mean(self, packed: torch.Tensor) -> torch.Tensor:
        """Per-sequence mean of the packed rows (= attention-masked mean pooling)."""
        total = packed.new_zeros((self.batch, packed.shape[-1])).index_add(0, self.row, packed)
        return total / self.lengths.clamp_min(1).unsqueeze(1).to(packed.dtype)


def keep_mask(shape: tuple[int, ...], p: float, dtype: torch.dtype) -> torch.Tensor:
    """Dropout's scaled keep mask (0 or 1/(1-p)) from 16-bit random numbers, four per 64-bit
    draw of torch's CPU generator: about 4x faster than ``bernoulli_``, which draws one number
    per element and took a fifth of a bf16 training step on CPU. p is rounded to a multiple
    of 2^-16 (0.1 -> 0.100006) and the scale uses the rounded p, so E[mask] = 1 exactly.
    The global generator is used, so seeding, checkpointed RNG state and activation
    checkpointing's RNG replay behave as with ``torch.nn.functional.dropout``."""
    n = math.prod(shape)
    words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64)
    drop_below = round(p * 65536)
    keep = words.view(torch.int16)[:n].view(shape) >= drop_below - 32768
    return keep.to(dtype) * (65536.0 / (65536 - drop_below))


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """``F.dropout``, with the faster mask on CPU (see ``keep_mask``); GPUs keep the native kernel."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p, True)
    return x * keep_mask(tuple(x.shape), p, x.dtype)


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` through oneDNN's matmul (the kernel PyTorch's own compiler emits on CPU).
    PyTorch sends float32 ``F.linear`` to MKL's sgemm, which on AMD CPUs (EPYC, AVX-512) ran at
    ~80 GFLOP/s on one core where oneDNN's ran at ~180 on the same shapes: the linear layers
    are nearly all of an inference forward. Float32 throughout: the two differ by float32
    rounding (1e-6 relative). No autograd formula: inference only (``fast_inference``)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def fast_inference(x: torch.Tensor) -> bool:
    """Whether the linear layers may take ``_onednn_linear``: float32 on a CPU with oneDNN, no
    autograd graph being built (evaluation under ``torch.no_grad``), no autocast (a bf16
    training run evaluates under its autocast: activations turn bf16 next to fp32 weights)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cpu")
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def _onednn_ok(module: nn.Module, x: torch.Tensor, fast: bool) -> bool:
    """A plain nn.Linear whose weight has ``x``'s dtype may take oneDNN when ``fast`` (adapters
    and ZeRO-3 partitioned layers always run their own forward)."""
    return fast and type(module) is nn.Linear and not hasattr(module.weight, "ds_id") and x.dtype == module.weight.dtype


def _linear(module: nn.Module, x: torch.Tensor, fast: bool) -> torch.Tensor:
    """``module(x)``; through oneDNN when ``_onednn_ok``."""
    return _onednn_linear(x, module.weight, module.bias) if _onednn_ok(module, x, fast) else module(x)


def _exact_gelu(fn) -> bool:
    """Whether the activation ``fn`` is the erf GELU (transformers' ``gelu``, ``nn.GELU()``)."""
    if isinstance(fn, nn.GELU):
        return fn.approximate == "none"
    return getattr(fn, "act", None) is F.gelu or fn is F.gelu


def _intermediate(layer: nn.Module, x: torch.Tensor, fast: bool) -> torch.Tensor:
    """The feed-forward's first linear layer and activation; with ``fast``, an erf GELU is
    applied inside oneDNN's matmul (one pass over the [T, 4h] output instead of two)."""
    dense, act = layer.intermediate.dense, layer.intermediate.intermediate_act_fn
    if _onednn_ok(dense, x, fast) and _exact_gelu(act):
        return torch.ops.mkldnn._linear_pointwise(x, dense.weight, dense.bias, "gelu", [], "none")
    return act(_linear(dense, x, fast))


def _partitioned(att: nn.Module) -> bool:
    """DeepSpeed ZeRO-3 shards the weights and gathers them only when the module itself runs."""
    return any(hasattr(p, "ds_id") for p in att.query.parameters())


def _attention(layer: nn.Module, x: torch.Tensor, pk: Packing, fast: bool = False) -> torch.Tensor:
    att = layer.attention.self
    heads, dh = att.num_attention_heads, att.attention_head_size

    def heads_view(t: torch.Tensor) -> torch.Tensor:
        return pk.unpack(t).view(pk.batch, pk.length, heads, dh).transpose(1, 2)

    if _partitioned(att) or not all(isinstance(m, nn.Linear) for m in (att.query, att.key, att.value)):
        q, k, v = (heads_view(_linear(m, x, fast)) for m in (att.query, att.key, att.value))
    else:  # one [T, 3h] matmul and one unpack instead of three
        w = torch.cat([att.query.weight, att.key.weight, att.value.weight])
        b = torch.cat([att.query.bias, att.key.bias, att.value.bias])
        linear = _onednn_linear if _onednn_ok(att.query, x, fast) else F.linear
        qkv = pk.unpack(linear(x, w, b)).view(pk.batch, pk.length, 3, heads, dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    p = att.dropout.p if att.training else 0.0
    scale = getattr(att, "scaling", dh ** -0.5)
    if p > 0 and q.device.type == "cpu":  # SDPA's CPU dropout is bernoulli_: attention by hand
        scores = (q @ k.transpose(-1, -2)) * scale
        probs = torch.softmax(scores.masked_fill(~pk.key_mask, float("-inf")), dim=-1)
        ctx = dropout(probs, p, True).to(v.dtype) @ v
    else:
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=pk.key_mask, dropout_p=p, scale=scale)
    return pk.pack(ctx.transpose(1, 2).reshape(pk.batch, pk.length, heads * dh))


def _layer(layer: nn.Module, x: torch.Tensor, pk: Packing, fast: bool = False) -> torch.Tensor:
    out, ff = layer.attention.output, layer.output
    x = out.LayerNorm(dropout(_linear(out.dense, _attention(layer, x, pk, fast), fast), out.dropout.p, out.training)
                      + x)
    h = _linear(ff.dense, _intermediate(layer, x, fast), fast)
    return ff.LayerNorm(dropout(h, ff.dropout.p, ff.training) + x)


def packed_forward(backbone: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   keep_first: bool = False, packing: Packing | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor | None, Packing]:
    """(last layer [T, h], first layer [T, h] if ``keep_first``, packing) for right-padded input;
    ``packing``: the mask's Packing when the caller built it already (see ``Packing.to``)."""
    pk = packing if packing is not None else Packing(attention_mask)
    # Embeddings on the padded layout: the model computes its own position ids there (RoBERTa's
    # start after padding_idx); gathering the real tokens afterwards is exact.
    x = pk.pack(backbone.embeddings(input_ids=input_ids))
    flag = "is_activation_checkpointing" if hasattr(type(backbone), "is_activation_checkpointing") \
        else "is_gradient_checkpointing"
    checkpointing = backbone.training and getattr(backbone, flag, False)
    fast = fast_inference(x)
    first = None
    for i, layer in enumerate(backbone.encoder.layer):
        if checkpointing and torch.is_grad_enabled():
            # Replays the saved RNG state in the recomputation: the dropout views survive.
            x = torch.utils.checkpoint.checkpoint(_layer, layer, x, pk, use_reentrant=False)
        else:
            x = _layer(layer, x, pk, fast)
        if i == 0 and keep_first:
            first = x
    return x, first, pk
