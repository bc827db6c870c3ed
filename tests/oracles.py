"""Reference implementations that the product's fast paths are tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hncse_dist.objective import _hnm_draw


def hard_negative_mix(
    q: torch.Tensor,
    candidates: torch.Tensor,
    k: int = 10,
    m: int = 40,
    alpha: float | None = 0.5,
    generator: torch.Generator | None = None,
    exclude: torch.Tensor | None = None,
    query_mix: int = 0,
    beta_max: float = 0.5,
) -> torch.Tensor:
    """HNCSE-HNM / MoCHi: [N, m + query_mix, d] unit-norm synthetic negatives per query.

    Each of the m synthetics is alpha * n_a + (1 - alpha) * n_b, L2-normalized, with (a, b)
    drawn with replacement from the query's top-k most cosine-similar candidates (after
    ``exclude`` [N, C] bool masks some out). ``alpha=None`` draws alpha ~ U(0, 1) each.
    ``query_mix`` more are beta * q + (1 - beta) * n_a with beta ~ U(0, beta_max).
    Gradient flows to ``candidates`` only if they carry it; ``q`` is always detached.
    The product uses ``hncse_dist.objective.hard_negative_cos``, which gives the cosines of q
    with these vectors without building them; this builds them, as the paper writes it.
    """
    qn = F.normalize(q.detach(), dim=-1)
    cn = F.normalize(candidates, dim=-1)
    sim = qn @ cn.detach().T
    _, top, pa, pb, a, pc, beta = _hnm_draw(sim, exclude, k, m, alpha, query_mix, beta_max, generator)
    out = []
    if m > 0:
        a = a.unsqueeze(-1).to(cn.dtype)
        out.append(F.normalize(a * cn[top.gather(1, pa)] + (1 - a) * cn[top.gather(1, pb)], dim=-1))
    if query_mix > 0:
        beta = beta.unsqueeze(-1).to(cn.dtype)
        nc = cn[top.gather(1, pc)].detach()
        out.append(F.normalize(beta * qn.unsqueeze(1).to(cn.dtype) + (1 - beta) * nc, dim=-1))
    if not out:
        return cn.new_zeros((q.shape[0], 0, cn.shape[1]))
    return torch.cat(out, dim=1)
