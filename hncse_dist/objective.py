"""The HNCSE objective: SimCSE's InfoNCE, positive mixing (PM), hard negative mixing (HNM).

Pure tensor functions, and ``HncseLoss``, the objective as a component: built once from an
``ObjectiveConfig`` (validated there), called on both views, returning a ``LossOutput``.
``HncseLoss`` / ``hncse_loss`` are the only code that talks to other ranks: when
torch.distributed is initialized they gather the candidates of all ranks (with gradient)
and return this rank's local loss, so that DDP's gradient average equals the gradient of the
single-process loss on the global batch.

Similarities are s(a, b) = cos(a, b) / temperature throughout.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .gather import gather_no_grad, gather_with_grad, world

OBJECTIVES = ("simcse", "pm", "hnm", "hncse")
PM_NONPOSITIVE = ("skip", "fixed")


@dataclass
class ObjectiveConfig:
    """Every choice of the objective; the defaults are documented in the README."""

    objective: str = "hncse"  # simcse | pm (positive mixing) | hnm (hard negative mixing) | hncse (both)
    temperature: float = 0.05  # tau: similarities are cos / tau
    # Positive mixing. w1/w2 are fixed weights for the "small gap" case (the reference code
    # searches them with Optuna at every step); bench/quality.py sweeps them on STS-B dev.
    pm_threshold: float = 0.1
    pm_w1: float = 0.8
    pm_w2: float = 0.2
    # d1 <= 0 makes the relative-gap test undefined: "skip" keeps the positive unchanged,
    # "fixed" mixes it with (w1, w2).
    pm_nonpositive: str = "skip"
    # The adaptive weights d1/(d1+d2), d2/(d1+d2) are computed from detached similarities
    # unless this is set; the vectors being mixed always carry gradient (reference code).
    pm_weight_grad: bool = False
    # Hard negative mixing (MoCHi-style).
    hnm_k: int = 10  # mix among each anchor's k most similar candidates
    hnm_m: int = 40  # synthetic negatives per anchor
    hnm_alpha: float | None = 0.5  # null: alpha ~ U(0, 1) per synthetic negative (MoCHi)
    hnm_query_mix: int = 0  # MoCHi's second type: beta*q + (1-beta)*n, beta ~ U(0, beta_max)
    hnm_beta_max: float = 0.5
    hnm_use_batch: bool = True  # candidates include the current global batch's positives
    hnm_grad: bool = False  # let gradient flow through batch candidates (reference code)
    hnm_mask_duplicates: bool = True  # never pick a candidate that is the anchor's sentence
    bank_in_logits: bool = False  # also use raw bank entries as plain negatives

    def validate(self) -> "ObjectiveConfig":
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective={self.objective!r} does not exist: use one of {', '.join(OBJECTIVES)}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.pm_nonpositive not in PM_NONPOSITIVE:
            raise ValueError(f"pm_nonpositive must be one of {PM_NONPOSITIVE}, got {self.pm_nonpositive!r}")
        if self.hnm_k < 1 or self.hnm_m < 0 or self.hnm_query_mix < 0:
            raise ValueError("hnm_k must be >= 1, hnm_m and hnm_query_mix >= 0")
        if self.hnm_alpha is not None and not 0.0 <= self.hnm_alpha <= 1.0:
            raise ValueError(f"hnm_alpha must be in [0, 1] or null for U(0,1), got {self.hnm_alpha}")
        return self


OBJECTIVE_OPTIONS = tuple(f.name for f in fields(ObjectiveConfig))


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """cos(a_i, b_j) as an [len(a), len(b)] matrix."""
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T


def info_nce(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: float = 0.05,
    extra_negatives: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    extra_cos: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of rows s(z1_i, z2_j) with label ``labels[i]`` (default i).

    ``extra_negatives`` [N, M, d]: M more negatives for each row, appended to its logits;
    ``extra_cos`` [N, M]: the same given directly as cosines (``hard_negative_cos``).
    z2 may hold more rows than z1 (all ranks' candidates, bank entries appended).
    """
    parts = [cosine_matrix(z1, z2)]
    if extra_negatives is not None and extra_negatives.shape[1] > 0:
        parts.append(torch.einsum("nd,nmd->nm", F.normalize(z1, dim=-1), F.normalize(extra_negatives, dim=-1)))
    if extra_cos is not None and extra_cos.shape[1] > 0:
        parts.append(extra_cos.to(parts[0].dtype))
    logits = (torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]) / temperature
    if labels is None:
        labels = torch.arange(z1.shape[0], device=z1.device)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.cross_entropy(logits, labels)


def hardest_negatives(
    z1: torch.Tensor, z2: torch.Tensor, labels: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cos to the positive, cos to the hardest negative, index of that negative) per row."""
    n = z1.shape[0]
    if labels is None:
        labels = torch.arange(n, device=z1.device)
    cos = cosine_matrix(z1, z2)
    rows = torch.arange(n, device=z1.device)
    d1 = cos[rows, labels]
    d2, j = cos.index_put((rows, labels), torch.tensor(float("-inf"), device=cos.device, dtype=cos.dtype)).max(dim=1)
    return d1, d2, j


def positive_mix(
    z1: torch.Tensor,
    z2: torch.Tensor,
    threshold: float = 0.1,
    w1: float = 0.8,
    w2: float = 0.2,
    labels: torch.Tensor | None = None,
    nonpositive: str = "skip",
    weight_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """HNCSE-PM: the positive of each row mixed with its hardest negative.

    Returns (z2_mixed [len(z1), d], mixed_mask [len(z1)] bool). Row i's positive is
    z2[labels[i]]; its hardest negative is the most cosine-similar z2 row other than that.
      d1 > d2, (d1 - d2) / d1 <= threshold: w1 * pos + w2 * neg
      d1 > d2, (d1 - d2) / d1 >  threshold: pos unchanged
      d1 <= d2:                            d1/(d1+d2) * pos + d2/(d1+d2) * neg
      d1 <= 0 (gap test undefined):        per ``nonpositive``: "skip" (unchanged) or "fixed"
    Cosines are used for the tests; the ratios are the same with cos/tau.
    """
    mixed, mask, _, _ = _positive_mix(z1, z2, threshold, w1, w2, labels, nonpositive, weight_grad)
    return mixed, mask


def _positive_mix(z1, z2, threshold, w1, w2, labels, nonpositive, weight_grad):
    """positive_mix, also returning the detached (cos positive, cos hardest negative) it used."""
    if labels is None:
        labels = torch.arange(z1.shape[0], device=z1.device)
    d1, d2, j = hardest_negatives(z1, z2, labels)
    found = (d1.detach(), d2.detach())
    if not weight_grad:
        d1, d2 = d1.detach(), d2.detach()
    positive = d1 > 0
    small_gap = positive & (d1 > d2) & ((d1 - d2) / d1.clamp_min(1e-12) <= threshold)
    below = positive & (d1 <= d2)
    fixed = small_gap | (~positive if nonpositive == "fixed" else torch.zeros_like(positive))
    total = (d1 + d2).clamp_min(1e-12)
    one, zero = torch.ones_like(d1), torch.zeros_like(d1)
    w_pos = torch.where(fixed, w1 * one, torch.where(below, d1 / total, one))
    w_neg = torch.where(fixed, w2 * one, torch.where(below, d2 / total, zero))
    mixed = w_pos.unsqueeze(1).to(z2.dtype) * z2[labels] + w_neg.unsqueeze(1).to(z2.dtype) * z2[j]
    return mixed, fixed | below, *found


class HnmDraw(NamedTuple):
    """The random choices of HNM for one batch (positions index each row's top-k)."""

    top_sim: torch.Tensor  # [N, k'] cosines of the top-k candidates (-inf where excluded)
    top: torch.Tensor  # [N, k'] candidate indices
    pa: torch.Tensor | None  # [N, m] first mixed candidate (position in the top-k)
    pb: torch.Tensor | None  # [N, m] second mixed candidate
    a: torch.Tensor | None  # [N, m] mixing weight alpha
    pc: torch.Tensor | None  # [N, query_mix] candidate mixed with the query
    beta: torch.Tensor | None  # [N, query_mix] query weight


class LossOutput(NamedTuple):
    loss: torch.Tensor  # this rank's loss (with gradient)
    stats: dict  # 0-dim detached tensors: cos/positive, pm/trigger_rate, hnm/...
    z2_global: torch.Tensor  # every rank's second view, detached [W*n, d]: what the bank keeps
    keys_global: torch.Tensor | None  # every rank's sentence keys [W*n] (None without keys)


def _hnm_draw(sim: torch.Tensor, exclude: torch.Tensor | None, k: int, m: int, alpha, query_mix: int,
              beta_max: float, generator):
    """The random choices of HNM for detached similarities ``sim`` [N, C], ``exclude``d
    candidates masked out (one place, so the vector form and the closed form select and
    consume the generator identically).

    Returns an HnmDraw.
    """
    if exclude is not None:
        sim = sim.masked_fill(exclude, float("-inf"))
    n, dev, dtype = sim.shape[0], sim.device, sim.dtype
    k_eff = min(k, sim.shape[1])
    top_sim, top = sim.topk(k_eff, dim=1)
    # Rows with fewer than k usable candidates draw only among the usable ones.
    usable = torch.isfinite(top_sim).sum(dim=1, keepdim=True).clamp_min(1)

    def draw(count: int) -> torch.Tensor:
        u = torch.rand((n, count), generator=generator, device=dev)
        return (u * usable).long().clamp_max(k_eff - 1)

    pa = pb = a = pc = beta = None
    if m > 0:
        pa, pb = draw(m), draw(m)
        if alpha is None:
            a = torch.rand((n, m, 1), generator=generator, device=dev, dtype=dtype).squeeze(-1)
        else:
            a = torch.full((n, m), float(alpha), device=dev, dtype=dtype)
    if query_mix > 0:
        beta = torch.rand((n, query_mix, 1), generator=generator, device=dev, dtype=dtype).squeeze(-1) * beta_max
        pc = draw(query_mix)
    return HnmDraw(top_sim, top, pa, pb, a, pc, beta)


def hard_negative_cos(
    q: torch.Tensor,
    candidates: torch.Tensor,
    k: int = 10,
    m: int = 40,
    alpha: float | None = 0.5,
    generator: torch.Generator | None = None,
    exclude: torch.Tensor | None = None,
    query_mix: int = 0,
    beta_max: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos(q_i, s_ij) for the synthetics s of ``hard_negative_mix`` (same arguments, same
    draws), in closed form: with unit n_a, n_b,

        cos(q, norm(alpha n_a + (1 - alpha) n_b))
            = (alpha cos(q, n_a) + (1 - alpha) cos(q, n_b)) / sqrt(alpha^2 + (1 - alpha)^2 + 2 alpha (1 - alpha) n_a.n_b)

    so the [N, m, d] synthetics are never built: the cosines come from the [N, C] similarity
    matrix that selects the top-k, and n_a.n_b from each row's [k, k] Gram matrix.
    Gradient reaches ``q`` (what the loss needs) and ``candidates`` if they carry it, exactly
    as through the explicit vectors (tests/oracles.py builds them to check this). Returns (cos [N, m + query_mix], top-k cos [N, k'] detached).
    """
    qn = F.normalize(q, dim=-1)
    cn = F.normalize(candidates, dim=-1)
    full = qn @ cn.T  # [N, C]: selection (detached) and logits (with gradient) in one product
    top_sim, top, pa, pb, a, pc, beta = _hnm_draw(full.detach(), exclude, k, m, alpha, query_mix, beta_max,
                                                  generator)  # an HnmDraw
    out = []
    if m > 0:
        topv = cn[top]  # [N, k', d]
        k_eff = top.shape[1]
        gram = (topv @ topv.transpose(1, 2)).flatten(1)  # [N, k'*k']
        ab = gram.gather(1, pa * k_eff + pb)
        ca, cb = full.gather(1, top.gather(1, pa)), full.gather(1, top.gather(1, pb))
        a = a.to(full.dtype)
        norm = (a * a + (1 - a) * (1 - a) + 2 * a * (1 - a) * ab).clamp_min(0).sqrt().clamp_min(1e-12)
        out.append((a * ca + (1 - a) * cb) / norm)
    if query_mix > 0:
        ic = top.gather(1, pc)
        beta = beta.to(full.dtype)
        qq = (qn * qn.detach()).sum(-1, keepdim=True)  # = 1, with the gradient of q . q_detached
        qc = torch.einsum("nd,nmd->nm", qn, cn.detach()[ic])
        norm = (beta * beta + (1 - beta) * (1 - beta) + 2 * beta * (1 - beta) * full.detach().gather(1, ic))
        out.append((beta * qq + (1 - beta) * qc) / norm.clamp_min(0).sqrt().clamp_min(1e-12))
    cos = torch.cat(out, dim=1) if out else full.new_zeros((q.shape[0], 0))
    return cos, top_sim


def alignment(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """Wang & Isola alignment: E ||f(x) - f(x+)||^2 on unit vectors (lower is better)."""
    return (F.normalize(z1, dim=-1) - F.normalize(z2, dim=-1)).pow(2).sum(-1).mean()


def uniformity(z: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """Wang & Isola uniformity: log E exp(-t ||f(x) - f(y)||^2) over pairs (lower is better)."""
    zn = F.normalize(z.float(), dim=-1)
    return torch.pdist(zn).pow(2).mul(-t).exp().mean().log()


class HncseLoss(torch.nn.Module):
    """The objective as a component: ``HncseLoss(ObjectiveConfig(objective="hncse", ...))``,
    validated once here; ``forward`` gives this rank's loss and what the bank needs.

    z1, z2 [n, d]: this rank's two dropout views. When torch.distributed is initialized (and
    ``gather``), every rank's z2 (and PM's mixed positives) are gathered with gradient and
    labels are offset by rank * n. ``bank`` [B, d]: detached embeddings of earlier global
    batches (identical on every rank), used as HNM candidates (and as logits if
    ``bank_in_logits``). ``keys``/``bank_keys``: int64 sentence hashes for duplicate masking.
    """

    def __init__(self, config: ObjectiveConfig | None = None, gather: bool = True):
        super().__init__()
        self.config = replace(config or ObjectiveConfig()).validate()
        self.gather = gather

    def forward(self, z1: torch.Tensor, z2: torch.Tensor, bank: torch.Tensor | None = None, *,
                keys: torch.Tensor | None = None, bank_keys: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> LossOutput:
        return _objective(z1, z2, self.config, bank, keys, bank_keys, generator, self.gather)


def hncse_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    objective: str = "hncse",
    bank: torch.Tensor | None = None,
    *,
    config: ObjectiveConfig | None = None,
    keys: torch.Tensor | None = None,
    bank_keys: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    gather: bool = True,
    return_stats: bool = False,
    **options,
):
    """Functional form of ``HncseLoss`` for one call: ``options`` override fields of
    ``config``. Returns the loss, or (loss, stats) with ``return_stats``."""
    cfg = replace(config or ObjectiveConfig(), objective=objective, **options).validate()
    out = _objective(z1, z2, cfg, bank, keys, bank_keys, generator, gather)
    return (out.loss, out.stats) if return_stats else out.loss


def _masked_mean_max(values: torch.Tensor, finite: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and max over the finite entries without a boolean index (which syncs a GPU)."""
    count = finite.sum().clamp_min(1)
    mean = torch.where(finite, values, torch.zeros_like(values)).sum() / count
    top = torch.where(finite, values, torch.full_like(values, float("-inf"))).max()
    return mean, top


def _objective(z1, z2, cfg: ObjectiveConfig, bank, keys, bank_keys, generator, gather: bool) -> LossOutput:
    objective = cfg.objective
    rank, world_size = world() if gather else (0, 1)
    n = z1.shape[0]
    labels = torch.arange(n, device=z1.device) + rank * n
    z2_all = gather_with_grad(z2) if world_size > 1 else z2
    uses_hnm = objective in ("hnm", "hncse") and (cfg.hnm_m > 0 or cfg.hnm_query_mix > 0)
    all_keys = None
    if keys is not None:
        all_keys = gather_no_grad(keys) if world_size > 1 else keys
    stats: dict[str, torch.Tensor] = {}

    candidates = z2_all
    found = None  # (cos positive, cos hardest negative), when PM has computed them
    if objective in ("pm", "hncse"):
        mixed, mask, *found = _positive_mix(
            z1, z2_all, cfg.pm_threshold, cfg.pm_w1, cfg.pm_w2, labels, cfg.pm_nonpositive, cfg.pm_weight_grad
        )
        candidates = gather_with_grad(mixed) if world_size > 1 else mixed
        stats["pm/trigger_rate"] = mask.float().mean().detach()

    synthetic_cos = None
    if uses_hnm:
        pool_keys = all_keys if cfg.hnm_mask_duplicates else None
        pool, exclude = _hnm_pool(z1, z2_all, labels, bank, keys, pool_keys, bank_keys, cfg)
        if pool.shape[0] > 0:
            synthetic_cos, top_sim = hard_negative_cos(
                z1, pool, cfg.hnm_k, cfg.hnm_m, cfg.hnm_alpha, generator, exclude, cfg.hnm_query_mix, cfg.hnm_beta_max
            )
            stats["hnm/topk_cos_mean"], stats["hnm/topk_cos_max"] = _masked_mean_max(top_sim, torch.isfinite(top_sim))
            stats["hnm/synthetic_cos_mean"] = synthetic_cos.detach().mean()

    if cfg.bank_in_logits and bank is not None and bank.shape[0] > 0:
        candidates = torch.cat([candidates, bank.detach().to(candidates.dtype)])
    loss = info_nce(z1, candidates, cfg.temperature, labels=labels, extra_cos=synthetic_cos)
    with torch.no_grad():
        d1, d2 = found if found is not None else hardest_negatives(z1, z2_all, labels)[:2]
        stats["cos/positive"] = d1.mean()
        stats["cos/hardest_negative"] = d2.mean()
    return LossOutput(loss, stats, z2_all.detach(), all_keys)


def _hnm_pool(z1, z2_all, labels, bank, keys, all_keys, bank_keys, cfg: ObjectiveConfig):
    """HNM candidates (current global batch and/or bank) and the [n, C] mask of forbidden ones.

    ``all_keys``: every rank's sentence keys (None: no duplicate masking)."""
    parts, masks = [], []
    n = z1.shape[0]
    if cfg.hnm_use_batch:
        parts.append(z2_all if cfg.hnm_grad else z2_all.detach())
        m = torch.zeros((n, z2_all.shape[0]), dtype=torch.bool, device=z1.device)
        m[torch.arange(n, device=z1.device), labels] = True  # the positive itself
        if all_keys is not None:
            m |= keys.unsqueeze(1) == all_keys.unsqueeze(0)
        masks.append(m)
    if bank is not None and bank.shape[0] > 0:
        parts.append(bank.detach().to(z1.dtype))
        if all_keys is not None and bank_keys is not None:
            masks.append(keys.unsqueeze(1) == bank_keys.unsqueeze(0))
        else:
            masks.append(torch.zeros((n, bank.shape[0]), dtype=torch.bool, device=z1.device))
    if not parts:
        return z1.new_zeros((0, z1.shape[1])), None
    return torch.cat(parts), torch.cat(masks, dim=1)
