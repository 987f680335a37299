"""The closed forms' default weights: the paper's raw configurations in our per-token units."""

from __future__ import annotations

import math

import pytest
import torch

from mace_core.cfr import Preservation, raw_weights
from mace_core.closed_form_weights import (
    PAPER_PRIOR_TOKENS,
    PAPER_WEIGHTS,
    profile_type,
    resolve_weights,
)
from mace_core.concepts import ConceptType
from mace_core.settings import ClosedFormSettings
from mace_core.text_stats import SecondMoment


def moment(n: int) -> SecondMoment:
    return SecondMoment(torch.eye(4, dtype=torch.float64) * n, n)


@pytest.mark.parametrize("n_concepts", [1, 5, 10, 37, 100, 1000])
@pytest.mark.parametrize("squared", [False, True])
def test_defaults_reproduce_the_papers_raw_sums_for_any_number_of_concepts(n_concepts, squared):
    paper = PAPER_WEIGHTS[ConceptType.CELEBRITY]
    n_main = n_concepts * 30 * 77  # all positions of 30 prompts per concept (the fusion)
    prior, domain = moment(20_000), moment(30 * 77)  # our prior and domain sets, any size
    w = resolve_weights(ClosedFormSettings(), ConceptType.CELEBRITY, n_concepts, n_main, domain.n, squared)
    raw = raw_weights(w, n_main, Preservation(prior, domain))
    s = paper.prior**2 if squared else paper.prior
    # Our prior is a mean over prior.n tokens: its total weight is the paper's scale times
    # the paper's prior sum (MS-COCO 2014 captions, 77 positions each).
    assert raw.prior * prior.n == pytest.approx(s * PAPER_PRIOR_TOKENS, rel=1e-9)
    # The domain set is a sum over prompts of the same size: raw weight s * w_d(N).
    assert raw.domain == pytest.approx(s * paper.domain_at(n_concepts), rel=1e-9)
    assert raw.ridge == 0 and w.retain == 1.0
    # The per-token prior falls as 1/N, as the paper's share of the prior does.
    w10 = resolve_weights(
        ClosedFormSettings(), ConceptType.CELEBRITY, 10 * n_concepts, 10 * n_main, domain.n, squared
    )
    assert w10.prior == pytest.approx(w.prior / 10)


def test_domain_weight_hits_the_published_points_and_interpolates_on_log_scales():
    paper = PAPER_WEIGHTS[ConceptType.CELEBRITY]
    for n, wd in paper.domain:
        assert paper.domain_at(n) == pytest.approx(wd)
    # Halfway between 10 and 100 concepts in log N is halfway in log w_d.
    assert paper.domain_at(round(math.sqrt(10 * 100))) == pytest.approx(math.sqrt(8e4 * 2e5), rel=0.02)
    assert paper.domain_at(1000) == 2e5 and paper.domain_at(0) == 8e3  # held at the ends
    ws = [paper.domain_at(n) for n in range(1, 200)]
    assert all(b >= a * (1 - 1e-12) for a, b in zip(ws, ws[1:], strict=False))
    assert PAPER_WEIGHTS[ConceptType.EXPLICIT].domain_at(10) == 0.0


def test_object_defaults_use_the_papers_ridge_and_no_prior():
    w = resolve_weights(ClosedFormSettings(), ConceptType.OBJECT, 10, 5000, 0)
    assert w.prior == 0 and w.domain == 0 and w.ridge * 5000 == pytest.approx(1e2)


def test_every_given_weight_overrides_the_paper():
    s = ClosedFormSettings(prior_weight=0.3, domain_weight=0.2, ridge=0.1, retain_weight=4.0)
    w = resolve_weights(s, ConceptType.CELEBRITY, 10, 5000, 300, True)
    assert (w.prior, w.domain, w.ridge, w.retain) == (0.3, 0.2, 0.1, 4.0)


def test_profile_is_the_majority_type_with_the_papers_order_breaking_ties():
    cel, sty, obj = ConceptType.CELEBRITY, ConceptType.STYLE, ConceptType.OBJECT
    assert profile_type([obj, obj, cel]) == obj
    assert profile_type([obj, sty]) == sty
    assert profile_type([sty, cel]) == cel
    with pytest.raises(ValueError):
        profile_type([])
