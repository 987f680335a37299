"""CFR (Eq. 1-2) and fusion (Eq. 7) against their normal equations and brute-force least squares."""

from __future__ import annotations

import random

import pytest
import torch

from mace_core.cfr import MIN_RCOND, Preservation, apply_cfr, cfr_matrix, raw_weights
from mace_core.closed_form_weights import Weights
from mace_core.fusion import FusionSums, fuse
from mace_core.lora import LoraFactors
from mace_core.text_stats import MappingStats, SecondMoment

D = 12
SHAPES = {"a.attn2.to_k.weight": (7, D), "a.attn2.to_v.weight": (7, D), "b.attn2.to_k.weight": (5, D)}


def rand(*shape, g):
    return torch.randn(*shape, generator=g, dtype=torch.float64)


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    Ef, Eg, Ep, Ed = rand(40, D, g=g), rand(40, D, g=g), rand(90, D, g=g), rand(30, D, g=g)
    weights = {k: rand(*s, g=g).float() for k, s in SHAPES.items()}
    return Ef, Eg, Ep, Ed, weights


def lstsq(rows_in: list[torch.Tensor], rows_out: list[torch.Tensor]) -> torch.Tensor:
    """argmin_W sum ||W x - y||^2 over stacked rows (x in rows_in, y in rows_out), as W."""
    X = torch.cat(rows_in)
    Y = torch.cat(rows_out)
    return torch.linalg.lstsq(X, Y).solution.T


def test_cfr_normal_equations_and_brute_force(data):
    Ef, Eg, Ep, Ed, weights = data
    stats = MappingStats(Eg.T @ Ef, Ef.T @ Ef, Ef.shape[0])
    prior, domain = SecondMoment.of(Ep), SecondMoment.of(Ed)
    s = Weights(prior=0.7, domain=2.0, retain=0.0, ridge=0.05)
    terms = Preservation(prior, domain)
    M, raw = cfr_matrix(stats, s, terms)
    assert raw == raw_weights(s, 40, terms) and raw.ridge_floor == 0
    assert raw.prior == pytest.approx(0.7 * 40 / 90) and raw.ridge == pytest.approx(0.05 * 40)
    assert raw.domain == pytest.approx(2.0 * 40 / 30)
    eye = torch.eye(D, dtype=torch.float64)
    refined = apply_cfr(weights, M)
    for key, W in weights.items():
        W = W.double()
        Wp = W @ M
        assert torch.allclose(refined[key].double(), Wp, atol=1e-5)
        # Normal equations of Eq. 1: W' (C + aC_p + wC_d + rI) = W (X + aC_p + wC_d + rI)
        R = raw.prior * prior.C + raw.domain * domain.C + raw.ridge * eye
        assert torch.allclose(Wp @ (stats.C + R), W @ (stats.X + R), atol=1e-9)
        # Brute force, solved per projection: M is the same for all of them.
        sa, sw, sr = raw.prior**0.5, raw.domain**0.5, raw.ridge**0.5
        brute = lstsq([Ef, sa * Ep, sw * Ed, sr * eye], [Eg @ W.T, sa * Ep @ W.T, sw * Ed @ W.T, sr * W.T])
        assert torch.allclose(brute, Wp, atol=1e-8)


def test_cfr_without_prior_maps_concept_onto_anchor(data):
    Ef, Eg, _, _, weights = data
    stats = MappingStats(Eg.T @ Ef, Ef.T @ Ef, Ef.shape[0])
    M, _ = cfr_matrix(stats, Weights(0.0, 0.0, 0.0, 1e-12), Preservation())
    # 40 pairs > d: the unregularised least squares solution, W' = W Eg^T Ef (Ef^T Ef)^-1
    W = weights["a.attn2.to_k.weight"].double()
    expected = W @ Eg.T @ Ef @ torch.linalg.inv(Ef.T @ Ef)
    assert torch.allclose(W @ M, expected, atol=1e-8)


def random_lora(g: torch.Generator, rank: int = 2) -> LoraFactors:
    return LoraFactors(
        {k: (rand(rank, s[1], g=g).float(), rand(s[0], rank, g=g).float()) for k, s in SHAPES.items()}
    )


def concepts(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(rand(30 + 5 * i, D, g=g), random_lora(g)) for i in range(n)]


def fusion_sums(cs) -> FusionSums:
    """The fusion sums of (token states, LoRA) pairs, streamed in in the given order."""
    sums = FusionSums.zeros(D)
    for E, lora in cs:
        sums.add_concept(SecondMoment.of(E), lora)
    return sums.flush()


def test_fusion_normal_equations_and_brute_force(data):
    _, _, Ep, Ed, original = data
    g = torch.Generator().manual_seed(5)
    refined = {k: (W.double() + 0.1 * rand(*W.shape, g=g)).float() for k, W in original.items()}
    cs = concepts(3)
    sums = fusion_sums(cs)
    prior, domain = SecondMoment.of(Ep), SecondMoment.of(Ed)
    s = Weights(prior=0.5, domain=3.0, retain=0.0, ridge=0.02)
    fused, raw = fuse(sums, original, refined, s, Preservation(prior, domain))
    n_total = sum(E.shape[0] for E, _ in cs)
    assert raw.prior == pytest.approx(0.5 * n_total / 90)
    assert raw.domain == pytest.approx(3.0 * n_total / 30)
    eye = torch.eye(D, dtype=torch.float64)
    for key in SHAPES:
        W, Wr, Ws = original[key].double(), refined[key].double(), fused[key].double()
        # Normal equations of Eq. 7.
        lhs = Ws @ (
            sum(E.T @ E for E, _ in cs) + raw.prior * prior.C + raw.domain * domain.C + raw.ridge * eye
        )
        rhs = sum((Wr + lora.delta(key).double()) @ E.T @ E for E, lora in cs)
        rhs = rhs + raw.prior * W @ prior.C + raw.domain * W @ domain.C + raw.ridge * Wr
        assert torch.allclose(lhs, rhs, rtol=1e-5, atol=1e-4)
        # Brute-force least squares over all the rows of Eq. 7's objective.
        sa, sw, sr = raw.prior**0.5, raw.domain**0.5, raw.ridge**0.5
        ins = [E for E, _ in cs] + [sa * Ep, sw * Ed, sr * eye]
        outs = [E @ (Wr + lora.delta(key).double()).T for E, lora in cs]
        outs += [sa * Ep @ W.T, sw * Ed @ W.T, sr * Wr.T]
        assert torch.allclose(lstsq(ins, outs), Ws, atol=1e-5)


def test_fusion_of_one_concept_without_prior_reproduces_its_lora(data):
    _, _, _, _, original = data
    ((E, lora),) = concepts(1)
    sums = fusion_sums([(E, lora)])
    fused, _ = fuse(sums, original, original, Weights(0.0, 0.0, 0.0, 1e-12), Preservation())
    for key in SHAPES:
        target = (original[key].double() + lora.delta(key).double()) @ E.T
        assert torch.allclose(fused[key].double() @ E.T, target, rtol=1e-5, atol=1e-4)


def test_fusion_is_order_free(data):
    _, _, Ep, _, original = data
    cs = concepts(6, seed=3)
    s = Weights(prior=1.0, domain=0.0, retain=0.0, ridge=1e-2)
    prior = Preservation(SecondMoment.of(Ep))
    full = fusion_sums(cs)
    ref, _ = fuse(full, original, original, s, prior)
    shuffled = cs[:]
    random.Random(0).shuffle(shuffled)
    other = fusion_sums(shuffled)
    assert other.concepts == 6
    # The sums agree to float64 rounding, so the solutions agree to float32 output rounding.
    assert torch.allclose(other.C.C, full.C.C, rtol=1e-12, atol=1e-12)
    for k in SHAPES:
        assert torch.allclose(other.dWC[k], full.dWC[k], rtol=1e-12, atol=1e-12)
    got, _ = fuse(other, original, original, s, prior)
    for k in SHAPES:
        assert torch.allclose(got[k], ref[k], rtol=0, atol=1e-6)


def test_blocked_streaming_equals_the_one_at_a_time_sums():
    """Concepts stream in blocks (one GEMM per projection and block); the sums equal the
    plain one-at-a-time sums to float64 rounding, for any block size, mixed ranks, and
    LoRAs that cover only some projections."""
    g = torch.Generator().manual_seed(11)
    cs = []
    for i in range(23):
        lora = random_lora(g, rank=1 + i % 3)
        if i % 5 == 0:  # a LoRA without one of the projections
            lora = LoraFactors({k: v for k, v in lora.factors.items() if k != "b.attn2.to_k.weight"})
        cs.append((SecondMoment.of(rand(20, D, g=g)), lora))
    # The sums written out: sum_k B_k (A_k C_k), in float64, one concept at a time.
    exact_dWC = {k: torch.zeros(s[0], D, dtype=torch.float64) for k, s in SHAPES.items()}
    for C_k, lora in cs:
        for key, (A, B) in lora.factors.items():
            exact_dWC[key] += B.double() @ (A.double() @ C_k.C)
    plain = FusionSums(SecondMoment.zeros(D), block=1)
    for C_k, lora in cs:
        plain.add_concept(C_k, lora)
    for block in (1, 2, 7, 64):
        blocked = FusionSums(SecondMoment.zeros(D), block=block)
        for C_k, lora in cs:
            blocked.add_concept(C_k, lora)
        assert blocked.concepts == 23 and blocked.C.n == plain.C.n
        dWC = blocked.flush().dWC  # reading the sums includes the last, partial block
        for k in SHAPES:
            exact = exact_dWC[k]
            err = (dWC[k] - exact).abs().max() / exact.abs().max()
            assert err <= 1e-10, (block, k, float(err))
        assert torch.equal(blocked.C.C, plain.C.C)


def test_retained_set_enters_both_closed_forms(data):
    Ef, Eg, Ep, Ed, weights = data
    stats = MappingStats(Eg.T @ Ef, Ef.T @ Ef, Ef.shape[0])
    retain = SecondMoment.of(Ed)
    M, raw = cfr_matrix(stats, Weights(0.0, 0.0, retain=2.0, ridge=0.0), Preservation(retain=retain))
    assert raw.retain == pytest.approx(2.0 * 40 / 30)
    W = weights["a.attn2.to_k.weight"].double()
    R = raw.retain * retain.C + raw.ridge_floor * torch.eye(D, dtype=torch.float64)
    assert torch.allclose(W @ M @ (stats.C + R), W @ (stats.X + R), atol=1e-9)


def test_ridge_of_zero_on_a_singular_system_is_raised_to_the_floor_and_reported(data):
    _, _, _, _, weights = data
    g = torch.Generator().manual_seed(7)
    # Token states in a hyperplane (as the tiny model's LayerNorm makes them): C is singular.
    basis = rand(D - 2, D, g=g)
    Ef, Eg = rand(40, D - 2, g=g) @ basis, rand(40, D - 2, g=g) @ basis
    stats = MappingStats(Eg.T @ Ef, Ef.T @ Ef, 40)
    M, raw = cfr_matrix(stats, Weights(0.0, 0.0, 0.0, 0.0), Preservation())
    assert torch.isfinite(M).all()
    assert raw.ridge == 0 and raw.ridge_floor > 0
    A = stats.C + raw.ridge_floor * torch.eye(D, dtype=torch.float64)
    lam = torch.linalg.eigvalsh(A)
    assert float(lam[0] / lam[-1]) >= MIN_RCOND * 0.99
    # Inside the states' span the mapping still holds (the floor is tiny against C).
    W = weights["a.attn2.to_k.weight"].double()
    rel = ((W @ M @ Ef.T - W @ Eg.T).norm() / (W @ Eg.T).norm()).item()
    lsq = W @ Eg.T @ torch.linalg.pinv(Ef.T)
    best = ((lsq @ Ef.T - W @ Eg.T).norm() / (W @ Eg.T).norm()).item()
    assert rel == pytest.approx(best, abs=1e-3)
    # The fusion does the same on a singular denominator.
    ((_, lora),) = concepts(1)
    sums = FusionSums.zeros(Ef.shape[1])
    sums.add_concept(SecondMoment.of(Ef), lora)
    fused, fraw = fuse(sums, weights, weights, Weights(0.0, 0.0, 0.0, 0.0), Preservation())
    assert fraw.ridge_floor > 0 and all(torch.isfinite(v).all() for v in fused.values())
    # A well-posed system gets no floor.
    _, ok = cfr_matrix(
        MappingStats(Eg.T @ Ef, Ef.T @ Ef + torch.eye(D, dtype=torch.float64), 40),
        Weights(0, 0, 0, 0),
        Preservation(),
    )
    assert ok.ridge_floor == 0
