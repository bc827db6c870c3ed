"""The HNCSE objective on hand-built vectors: every PM case, HNM properties, InfoNCE by hand."""

import math

import pytest
import torch
import torch.nn.functional as F

from hncse_dist.objective import (
    HncseLoss,
    ObjectiveConfig,
    alignment,
    hard_negative_cos,
    hncse_loss,
    info_nce,
    positive_mix,
    uniformity,
)
from tests.oracles import hard_negative_mix


def unit(*xs):
    return F.normalize(torch.tensor(xs, dtype=torch.float64), dim=-1)


def test_info_nce_equals_hand_computed_value():
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    z2 = torch.tensor([[1.0, 1.0], [0.0, 2.0]], dtype=torch.float64)
    tau = 0.5
    c = 1 / math.sqrt(2)
    # row 0: cos(z1_0, z2_0) = c, cos(z1_0, z2_1) = 0 ; row 1: cos = c and 1
    row0 = -math.log(math.exp(c / tau) / (math.exp(c / tau) + math.exp(0.0)))
    row1 = -math.log(math.exp(1 / tau) / (math.exp(c / tau) + math.exp(1 / tau)))
    assert info_nce(z1, z2, tau).item() == pytest.approx((row0 + row1) / 2, rel=1e-12)


def test_info_nce_extra_negatives_are_appended_per_row():
    torch.manual_seed(0)
    z1, z2 = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    extra = torch.randn(3, 2, 4, dtype=torch.float64)
    tau = 0.1
    logits = F.normalize(z1, dim=-1) @ F.normalize(z2, dim=-1).T / tau
    ex = torch.stack([F.normalize(z1[i], dim=-1) @ F.normalize(extra[i], dim=-1).T for i in range(3)]) / tau
    expected = F.cross_entropy(torch.cat([logits, ex], 1), torch.arange(3))
    assert info_nce(z1, z2, tau, extra_negatives=extra).item() == pytest.approx(expected.item(), rel=1e-12)


# PM: query 0 and its positive / the other row decide the case of row 0.
def _pm_case(pos, neg, **kw):
    z1 = unit([1.0, 0.0, 0.0], [0.0, 0.0, 1.0])
    z2 = torch.stack([torch.tensor(pos, dtype=torch.float64), torch.tensor(neg, dtype=torch.float64)])
    mixed, mask = positive_mix(z1, z2, threshold=0.1, w1=0.7, w2=0.3, **kw)
    return z2, mixed, mask


def test_pm_small_gap_uses_fixed_weights():
    # d1 = cos(q, pos) = 0.9 / |pos|... build pos, neg with cos 0.95 and 0.90: gap 5.3% <= 10%
    pos = [0.95, math.sqrt(1 - 0.95**2), 0.0]
    neg = [0.90, -math.sqrt(1 - 0.90**2), 0.0]
    z2, mixed, mask = _pm_case(pos, neg)
    assert bool(mask[0])
    torch.testing.assert_close(mixed[0], 0.7 * z2[0] + 0.3 * z2[1])


def test_pm_large_gap_keeps_the_positive():
    pos = [0.95, math.sqrt(1 - 0.95**2), 0.0]
    neg = [0.50, -math.sqrt(1 - 0.50**2), 0.0]  # gap 47% > 10%
    z2, mixed, mask = _pm_case(pos, neg)
    assert not bool(mask[0])
    torch.testing.assert_close(mixed[0], z2[0])


def test_pm_negative_closer_than_positive_uses_adaptive_weights():
    pos = [0.6, math.sqrt(1 - 0.36), 0.0]
    neg = [0.8, -0.6, 0.0]
    z2, mixed, mask = _pm_case(pos, neg)
    d1, d2 = 0.6, 0.8
    assert bool(mask[0])
    torch.testing.assert_close(mixed[0], d1 / (d1 + d2) * z2[0] + d2 / (d1 + d2) * z2[1])


def test_pm_equal_similarity_is_the_adaptive_case():
    pos = [0.6, 0.8, 0.0]
    neg = [0.6, -0.8, 0.0]
    z2, mixed, mask = _pm_case(pos, neg)
    torch.testing.assert_close(mixed[0], 0.5 * z2[0] + 0.5 * z2[1])


def test_pm_nonpositive_d1_is_skipped_by_default_and_mixed_when_fixed():
    pos = [-0.5, math.sqrt(0.75), 0.0]  # d1 = -0.5: the relative-gap test is undefined
    neg = [0.3, -math.sqrt(0.91), 0.0]
    z2, mixed, mask = _pm_case(pos, neg)
    assert not bool(mask[0])
    torch.testing.assert_close(mixed[0], z2[0])
    z2, mixed, mask = _pm_case(pos, neg, nonpositive="fixed")
    assert bool(mask[0])
    torch.testing.assert_close(mixed[0], 0.7 * z2[0] + 0.3 * z2[1])


def test_pm_hardest_negative_is_searched_over_other_rows_only():
    z1 = unit([1, 0, 0], [0, 1, 0], [0, 0, 1])
    z2 = unit([0.9, 0.1, 0], [0.0, 1, 0], [0.7, 0.0, 0.3])  # row 0's hardest = row 2 (cos .92 vs .1)
    mixed, mask = positive_mix(z1, z2, threshold=0.5, w1=0.5, w2=0.5)
    torch.testing.assert_close(mixed[0], 0.5 * z2[0] + 0.5 * z2[2])


def test_pm_gradient_flows_through_the_mixed_vectors():
    z1 = unit([1.0, 0.0], [0.0, 1.0])
    z2 = unit([0.6, 0.8], [0.8, 0.6]).requires_grad_()
    mixed, mask = positive_mix(z1, z2)
    mixed.sum().backward()
    assert z2.grad.abs().sum() > 0


def _hnm_inputs():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(5, 8, generator=g)
    cands = torch.randn(30, 8, generator=g)
    return q, cands


def test_hnm_outputs_unit_norm_and_shape():
    q, cands = _hnm_inputs()
    out = hard_negative_mix(q, cands, k=4, m=7, generator=torch.Generator().manual_seed(1))
    assert out.shape == (5, 7, 8)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(5, 7))


@pytest.mark.parametrize("alpha", [0.5, 0.25, None])
def test_hnm_synthetics_are_convex_mixes_of_two_of_the_querys_topk(alpha):
    q, cands = _hnm_inputs()
    k = 4
    out = hard_negative_mix(q, cands, k=k, m=9, alpha=alpha, generator=torch.Generator().manual_seed(2))
    cn = F.normalize(cands, dim=-1)
    sims = F.normalize(q, dim=-1) @ cn.T
    for i in range(q.shape[0]):
        top = sims[i].topk(k).indices
        # brute force: some pair (a, b) of the top-k and weight t in [0,1] reproduces the synthetic
        for s in out[i]:
            best = float("inf")
            for a in top:
                for b in top:
                    d = cn[a] - cn[b]
                    # project: s ∝ t*na + (1-t)*nb ; solve t on the unnormalized line, then compare directions
                    ts = torch.linspace(0, 1, 201)
                    line = F.normalize(ts[:, None] * cn[a] + (1 - ts[:, None]) * cn[b], dim=-1)
                    best = min(best, (line - s).norm(dim=-1).min().item())
                    if alpha is not None:
                        exact = F.normalize(alpha * cn[a] + (1 - alpha) * cn[b], dim=-1)
                        best = min(best, (exact - s).norm().item() * 1e3)  # exact match -> ~0
            assert best < 1e-2


def test_hnm_topk_are_the_most_similar_candidates():
    q, cands = _hnm_inputs()
    # with k=1 every synthetic is the single most similar candidate itself
    out = hard_negative_mix(q, cands, k=1, m=3, generator=torch.Generator().manual_seed(0))
    best = (F.normalize(q, dim=-1) @ F.normalize(cands, dim=-1).T).argmax(1)
    torch.testing.assert_close(out, F.normalize(cands, dim=-1)[best].unsqueeze(1).expand(-1, 3, -1))


def test_hnm_exclude_mask_is_respected():
    q, cands = _hnm_inputs()
    sims = F.normalize(q, dim=-1) @ F.normalize(cands, dim=-1).T
    exclude = torch.zeros_like(sims, dtype=torch.bool)
    exclude[torch.arange(5), sims.argmax(1)] = True
    out = hard_negative_mix(q, cands, k=1, m=2, exclude=exclude, generator=torch.Generator().manual_seed(0))
    second = sims.masked_fill(exclude, -2).argmax(1)
    torch.testing.assert_close(out[:, 0], F.normalize(cands, dim=-1)[second])


def test_hnm_is_deterministic_with_a_generator():
    q, cands = _hnm_inputs()
    a = hard_negative_mix(q, cands, alpha=None, generator=torch.Generator().manual_seed(5))
    b = hard_negative_mix(q, cands, alpha=None, generator=torch.Generator().manual_seed(5))
    c = hard_negative_mix(q, cands, alpha=None, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_hnm_query_mix_adds_query_biased_negatives():
    q, cands = _hnm_inputs()
    out = hard_negative_mix(q, cands, k=3, m=2, query_mix=4, beta_max=0.5, generator=torch.Generator().manual_seed(0))
    assert out.shape == (5, 6, 8)
    qn = F.normalize(q, dim=-1)
    # query-mixed synthetics lean towards the query more than plain ones on average
    assert (out[:, 2:] @ qn.unsqueeze(-1)).mean() > (out[:, :2] @ qn.unsqueeze(-1)).mean()


def test_hnm_synthetics_carry_no_gradient_by_default():
    q, cands = _hnm_inputs()
    q.requires_grad_()
    out = hard_negative_mix(q, cands.detach())
    assert not out.requires_grad


def _views(n=6, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, d, generator=g, dtype=torch.float64)
    z2 = z1 + 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64)
    return z1, z2


def test_modes_reduce_to_each_other_when_their_parts_are_off():
    z1, z2 = _views()
    simcse = hncse_loss(z1, z2, "simcse")
    assert simcse.item() == pytest.approx(info_nce(z1, z2).item(), rel=1e-12)
    # HNM with no synthetic negatives is SimCSE; the hybrid without them is PM
    assert hncse_loss(z1, z2, "hnm", hnm_m=0).item() == pytest.approx(simcse.item(), rel=1e-12)
    pm = hncse_loss(z1, z2, "pm")
    assert hncse_loss(z1, z2, "hncse", hnm_m=0).item() == pytest.approx(pm.item(), rel=1e-12)
    # PM that never triggers (positives far ahead of every negative) is SimCSE
    far = z1 + 0.01 * torch.randn_like(z1)
    assert hncse_loss(z1, far, "pm").item() == pytest.approx(hncse_loss(z1, far, "simcse").item(), rel=1e-12)
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    assert hncse_loss(z1, far, "hncse", generator=g()).item() == pytest.approx(
        hncse_loss(z1, far, "hnm", generator=g()).item(), rel=1e-12)


def test_hybrid_equals_pm_logits_plus_hnm_synthetics():
    z1, z2 = _views()
    cfg = ObjectiveConfig(hnm_k=3, hnm_m=5)
    mixed, _ = positive_mix(z1, z2, cfg.pm_threshold, cfg.pm_w1, cfg.pm_w2)
    exclude = torch.eye(6, dtype=torch.bool)
    syn = hard_negative_mix(z1, z2.detach(), 3, 5, 0.5, torch.Generator().manual_seed(4), exclude)
    expected = info_nce(z1, mixed, 0.05, syn)
    got = hncse_loss(z1, z2, "hncse", config=cfg, generator=torch.Generator().manual_seed(4), hnm_mask_duplicates=False)
    assert got.item() == pytest.approx(expected.item(), rel=1e-12)


def test_synthetic_negatives_raise_the_loss():
    z1, z2 = _views()
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert hncse_loss(z1, z2, "hnm", generator=g()) > hncse_loss(z1, z2, "simcse")


def test_bank_candidates_and_duplicate_masking():
    z1, z2 = _views(n=4)
    keys = torch.arange(4)
    # a bank holding an exact copy of each anchor: with masking, no synthetic may come from it
    bank = z1.clone()
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    masked = hncse_loss(z1, z2, "hnm", bank, keys=keys, bank_keys=keys, generator=g(), hnm_k=1, hnm_use_batch=False)
    unmasked = hncse_loss(z1, z2, "hnm", bank, keys=keys, bank_keys=keys + 100, generator=g(), hnm_k=1,
                          hnm_use_batch=False)
    # unmasked: the top-1 candidate IS the anchor, cos = 1 -> a much larger loss
    assert unmasked > masked + 1.0


def test_bank_in_logits_adds_plain_negatives():
    z1, z2 = _views(n=4)
    bank = torch.randn(8, 16, dtype=torch.float64)
    got = hncse_loss(z1, z2, "simcse", bank, bank_in_logits=True)
    assert got.item() == pytest.approx(info_nce(z1, torch.cat([z2, bank])).item(), rel=1e-12)


def test_unknown_objective_names_the_choices():
    z1, z2 = _views()
    with pytest.raises(ValueError, match="simcse, pm, hnm, hncse"):
        hncse_loss(z1, z2, "moco")
    with pytest.raises(ValueError, match="simcse, pm, hnm, hncse"):  # the component checks at construction
        HncseLoss(ObjectiveConfig(objective="moco"))


def test_alignment_and_uniformity_values():
    z = torch.eye(3, dtype=torch.float64)
    assert alignment(z, z).item() == 0.0
    # pairwise squared distances between orthonormal vectors are 2
    assert uniformity(z).item() == pytest.approx(-4.0)


@pytest.mark.parametrize("alpha,query_mix,cand_grad", [(0.5, 0, False), (None, 0, False), (0.3, 3, False),
                                                       (0.5, 2, True)])
def test_closed_form_hnm_cosines_equal_the_explicit_synthetics(alpha, query_mix, cand_grad):
    """hard_negative_cos (what the loss uses) == cos(q, hard_negative_mix vectors): values and
    the gradients reaching q and, when they carry it, the candidates."""
    g = torch.Generator().manual_seed(0)
    q0 = torch.randn(6, 8, generator=g, dtype=torch.float64)
    c0 = torch.randn(25, 8, generator=g, dtype=torch.float64)
    exclude = torch.zeros(6, 25, dtype=torch.bool)
    exclude[0, :23] = True  # row 0 keeps only 2 usable candidates (< k)
    exclude[1, 4] = True
    w = torch.randn(6, 5 + query_mix, generator=g, dtype=torch.float64)
    results = []
    for closed in (False, True):
        q, c = q0.clone().requires_grad_(), c0.clone().requires_grad_(cand_grad)
        args = (q, c, 4, 5, alpha, torch.Generator().manual_seed(7), exclude, query_mix, 0.5)
        if closed:
            cos, top_sim = hard_negative_cos(*args)
        else:
            cos = torch.einsum("nd,nmd->nm", F.normalize(q, dim=-1), hard_negative_mix(*args))
        (cos * w).sum().backward()
        results.append((cos.detach(), q.grad, c.grad))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-10, atol=1e-12)
    if cand_grad:
        assert results[0][2].abs().sum() > 0
        torch.testing.assert_close(results[1][2], results[0][2], rtol=1e-10, atol=1e-12)
    else:
        assert results[1][2] is None
    # the returned top-k similarities are the k best allowed cosines, row 0 padded with -inf
    sims = (F.normalize(q0, dim=-1) @ F.normalize(c0, dim=-1).T).masked_fill(exclude, float("-inf"))
    torch.testing.assert_close(top_sim, sims.topk(4, dim=1).values)


def test_loss_hands_back_the_global_batch_for_the_bank():
    z1, z2 = _views()
    out = HncseLoss(ObjectiveConfig(objective="simcse"))(z1, z2, keys=torch.arange(6))
    assert torch.equal(out.z2_global, z2) and not out.z2_global.requires_grad
    assert torch.equal(out.keys_global, torch.arange(6))
    assert out.loss.item() == pytest.approx(hncse_loss(z1, z2, "simcse").item(), rel=1e-12)
    stats = hncse_loss(z1, z2, "hncse", keys=torch.arange(6), return_stats=True, generator=torch.Generator())[1]
    assert {"hnm/topk_cos_mean", "hnm/topk_cos_max", "hnm/synthetic_cos_mean", "pm/trigger_rate",
            "cos/positive", "cos/hardest_negative"} <= set(stats)
