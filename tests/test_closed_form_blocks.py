"""An MMDiT's token-state space [context | pooled]: the statistics record their rows per block, and
both closed forms solve each block as its own least-squares problem, its weights converted with
its own counts (the pooled block: one row per prompt, the paper's prior as one pooled row per
caption, the scale once)."""

from __future__ import annotations

import pytest
import torch

from mace_core.cfr import Preservation, apply_cfr, cfr_matrix
from mace_core.closed_form_weights import (
    PAPER_PRIOR_CAPTIONS,
    PAPER_PRIOR_TOKENS,
    PAPER_WEIGHTS,
    Weights,
    resolve_weights,
    solve_weights,
)
from mace_core.concepts import ConceptType
from mace_core.errors import ArtefactError
from mace_core.fusion import FusionSums, fuse
from mace_core.lora import LoraFactors
from mace_core.settings import ClosedFormSettings
from mace_core.text_stats import (
    CONTEXT,
    POOLED,
    ConceptTextStats,
    MappingStats,
    PooledBlock,
    SecondMoment,
    second_moment_bytes,
    second_moment_from_bytes,
)

J, P = 8, 4  # context and pooled columns
D = J + P
KEYS = {"context_embedder.weight": (6, D), "pooled.weight": (5, D)}


def rows(n_context: int, n_pooled: int, g: torch.Generator) -> torch.Tensor:
    """``n_context`` rows [state, 0] then ``n_pooled`` rows [0, pooled], as ``encode`` lays them out."""
    e = torch.zeros(n_context + n_pooled, D, dtype=torch.float64)
    e[:n_context, :J] = torch.randn(n_context, J, generator=g, dtype=torch.float64)
    e[n_context:, J:] = torch.randn(n_pooled, P, generator=g, dtype=torch.float64)
    return e


def moment(n_context: int, n_pooled: int, g: torch.Generator) -> SecondMoment:
    return SecondMoment.of(rows(n_context, n_pooled, g), P)


def mapping(n_context: int, n_pooled: int, g: torch.Generator) -> MappingStats:
    f, e = rows(n_context, n_pooled, g), rows(n_context, n_pooled, g)
    return MappingStats(e.T @ f, f.T @ f, f.shape[0], PooledBlock(P, n_pooled))


def block(stat, cols: slice):
    """The statistic of one block alone (its rows, its columns), a one-block space."""
    n = stat.rows(POOLED if cols.start else CONTEXT)
    if isinstance(stat, MappingStats):
        return MappingStats(stat.X[cols, cols], stat.C[cols, cols], n)
    return SecondMoment(stat.C[cols, cols], n)


def test_statistics_record_their_rows_per_block_and_keep_them_through_storage():
    g = torch.Generator().manual_seed(0)
    a, b = moment(30, 3, g), moment(20, 2, g)
    assert (a.n, a.pooled, a.rows(CONTEXT), a.rows(POOLED)) == (33, PooledBlock(P, 3), 30, 3)
    assert (a + b).pooled == PooledBlock(P, 5) and (a + b).rows(CONTEXT) == 50
    total = SecondMoment.zeros(D)  # an empty sum takes the layout of what is added
    total += a
    assert total.pooled == a.pooled and a.columns(POOLED) == slice(J, D)
    again = second_moment_from_bytes(second_moment_bytes(a), "prior")
    assert again.pooled == a.pooled and torch.equal(again.C, a.C)
    stats = ConceptTextStats(mapping(40, 3, g), b)
    back = ConceptTextStats.from_tensors(stats.to_tensors())
    assert back.mapping.pooled == PooledBlock(P, 3) and back.fusion.pooled == PooledBlock(P, 2)
    # SD's space is one block: its statistics are stored as they always were.
    sd = ConceptTextStats(MappingStats(a.C, a.C, 33), SecondMoment(a.C, 33))
    assert set(sd.to_tensors()) == {"cfr.X", "cfr.C", "cfr.n", "fusion.C", "fusion.n"}
    assert ConceptTextStats.from_tensors(sd.to_tensors()).mapping.pooled is None
    with pytest.raises(ArtefactError, match="layouts"):
        a + SecondMoment(a.C, 33)
    mixed = rows(3, 1, g)
    mixed[0, -1] = 1.0  # a context row with a pooled entry
    with pytest.raises(RuntimeError, match="block-diagonal"):
        SecondMoment.of(mixed, P)


def test_each_block_is_solved_apart_with_its_own_weights_and_counts():
    """CFR and the fusion on [context | pooled] equal two one-block solves, each with its
    block's rows and weights: the pooled rows never dilute into the context's counts."""
    g = torch.Generator().manual_seed(1)
    stats = mapping(60, 6, g)
    terms = Preservation(moment(90, 9, g), moment(30, 3, g))
    w = Weights(0.7, 2.0, 0.0, 0.05, pooled=Weights(3.0, 0.5, 0.0, 0.01))
    M, raw = cfr_matrix(stats, w, terms)
    assert raw.ridge_floor == 0 and raw.pooled is not None
    assert raw.prior == pytest.approx(0.7 * 60 / 90) and raw.pooled.prior == pytest.approx(3.0 * 6 / 9)
    assert raw.pooled.domain == pytest.approx(0.5 * 6 / 3) and raw.pooled.ridge == pytest.approx(0.01 * 6)
    assert set(raw.to_dict()["pooled"]) >= {"prior", "domain", "ridge", "ridge_floor"}
    c, p = slice(0, J), slice(J, D)
    assert not M[c, p].any() and not M[p, c].any()
    for cols, wb in ((c, w.block(CONTEXT)), (p, w.block(POOLED))):
        alone, _ = cfr_matrix(
            block(stats, cols), wb, Preservation(*(block(m, cols) for m in terms.terms().values() if m))
        )
        assert torch.allclose(M[cols, cols], alone, atol=1e-10)
    # The fusion, on projections that read either block (statistics weights, zero elsewhere).
    original = {k: torch.randn(*s, generator=g).float() for k, s in KEYS.items()}
    original["context_embedder.weight"][:, J:] = 0
    original["pooled.weight"][:, :J] = 0
    refined = apply_cfr(original, M)
    sums = FusionSums.zeros(D)
    for _ in range(3):
        A = torch.zeros(2, D)
        A[:, :J] = torch.randn(2, J, generator=g)  # a LoRA reads the context columns only
        lora = LoraFactors({"context_embedder.weight": (A, torch.randn(6, 2, generator=g))})
        sums.add_concept(moment(40, 2, g), lora)
    assert sums.C.pooled == PooledBlock(P, 6)
    fused, fraw = fuse(sums, original, refined, w, terms)
    assert fraw.pooled.prior == pytest.approx(3.0 * 6 / 9) and fraw.prior == pytest.approx(0.7 * 120 / 90)
    for cols, wb in ((c, w.block(CONTEXT)), (p, w.block(POOLED))):
        one = FusionSums(block(sums.C, cols))
        one.dWC = {k: v[:, cols] for k, v in sums.flush().dWC.items()}
        part = {k: v[:, cols] for k, v in original.items()}
        pterms = Preservation(*(block(m, cols) for m in terms.terms().values() if m))
        alone, _ = fuse(one, part, {k: v[:, cols] for k, v in refined.items()}, wb, pterms)
        for k in KEYS:
            assert torch.allclose(fused[k][:, cols], alone[k], atol=1e-5)
    # A prior computed without the layout (another method version) is refused, not misread.
    flat = SecondMoment(terms.prior.C, terms.prior.n)
    with pytest.raises(ArtefactError, match="prior statistics"):
        cfr_matrix(stats, w, Preservation(flat, terms.domain))


@pytest.mark.parametrize("squared", [False, True])
def test_the_pooled_block_converts_the_papers_configuration_with_its_own_counts(squared):
    """The context as for SD (the paper's 616,767 x 77 prior token states against the context
    rows, s^2 in CFR); the pooled block: the paper's prior is one pooled row per caption
    (616,767) against our captions' pooled rows, with Eq. 2's scale s, squared or not."""
    paper = PAPER_WEIGHTS[ConceptType.CELEBRITY]
    s = paper.prior
    s_ctx = s * s if squared else s
    g = torch.Generator().manual_seed(2)
    # 2 concepts x 30 prompt pairs (one pooled pair each), 421 captions of 101 context rows.
    main, prior, domain = mapping(4500, 60, g), moment(421 * 101, 421, g), moment(30 * 101, 30, g)
    main.C[:] = torch.eye(D)  # only the counts matter here
    w = solve_weights(ClosedFormSettings(), ConceptType.CELEBRITY, 2, main, domain, squared)
    _, raw = cfr_matrix(main, w, Preservation(prior, domain))
    assert raw.prior * prior.rows(CONTEXT) == pytest.approx(s_ctx * PAPER_PRIOR_TOKENS, rel=1e-9)
    assert raw.pooled.prior * prior.rows(POOLED) == pytest.approx(s * PAPER_PRIOR_CAPTIONS, rel=1e-9)
    assert raw.domain == pytest.approx(s_ctx * paper.domain_at(2), rel=1e-9)
    assert raw.pooled.domain == pytest.approx(s * paper.domain_at(2), rel=1e-9)
    # Its per-token prior falls as 1/N with its own rows, as the context's does.
    assert w.pooled.prior == pytest.approx(s * PAPER_PRIOR_CAPTIONS / 60)
    # Given weights are per-token in every block; SD's one block is resolved as it always was.
    given = solve_weights(ClosedFormSettings(prior_weight=0.3), ConceptType.CELEBRITY, 2, main, domain)
    assert given.prior == given.pooled.prior == 0.3
    sd_main = MappingStats(main.X, main.C, 4500)
    sd = solve_weights(
        ClosedFormSettings(), ConceptType.CELEBRITY, 2, sd_main, SecondMoment(domain.C, 3030), squared
    )
    assert sd == resolve_weights(ClosedFormSettings(), ConceptType.CELEBRITY, 2, 4500, 3030, squared)
    assert sd.pooled is None and "pooled" not in sd.to_dict()
