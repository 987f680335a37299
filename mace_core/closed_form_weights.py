"""Default weights of the closed forms (Eq. 2 and Eq. 7): the paper's training configurations
for each concept type, converted to our per-token-mean scale for any number of concepts.

The paper's weights multiply plain sums: a prior scale s on the sum over every token state
of the MS-COCO 2014 captions (train + val, 616,767 captions x 77 positions), a domain
weight w_d on top of s for the sum over the domain prompts ("a person" in the type's
templates), and a ridge. Its concept side grows with the number of concepts N while those
sums do not, so the preservation share falls as 1/N. Our weights divide each sum by its
token count; to reproduce the paper at any N they are derived at solve time:

    a = s_eff * N_coco / N_f          prior (N_f: tokens of the mapping term)
    w = s_eff * w_d(N) * N_d / N_f    domain set (N_d: tokens of our domain prompts)
    r = r_raw / N_f                   ridge

with s_eff = s^2 in CFR (the reference experiments apply the scale twice there) or s
(fusion; CFR with ``cfr_scale_squared`` off). The raw domain weight is given for a few
concept counts; between them it is interpolated linearly in (log N, log w_d), and it is
held at the end values outside them (the paper publishes nothing beyond).

Blocks. An MMDiT's statistics are block-diagonal in [context | pooled] (``mace_core.text_stats``),
so each closed form is one least-squares problem per block, and each block converts the paper's
configuration with its own counts: N_f, N_p, N_d are the block's rows (context: aligned context
tokens, T5 / CLIP + T5 positions; pooled: one row per prompt or aligned pair), and N_coco is the
paper's prior sum in that block: 616,767 x 77 token states for the context (as for SD), and one
pooled row per caption, 616,767, for the pooled block. Raw, the pooled prior is then
s_eff * 616,767 / (our captions): each of our captions stands for the same share of the paper's
captions in both blocks. The reference experiments squared the scale in their CFR of attn2,
the context block's counterpart; no reference experiment edits a pooled projection, so its
block takes Eq. 2 as the paper writes it, s_eff = s in both closed forms. (Squared, its prior
is s^2 x 616,767 = 0.006 caption-equivalents against one pooled pair per prompt: nothing, and
CFR overfits the pooled projection; the context block has no such problem because most of its
aligned pairs are the prompt's other tokens, which the mapping term itself keeps.)
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from typing import Any

from mace_core.concepts import ConceptType
from mace_core.settings import ClosedFormSettings
from mace_core.text_stats import CONTEXT, POOLED, Blocked

# MS-COCO 2014 captions (train + val) at all 77 positions: the paper's prior sum.
PAPER_PRIOR_CAPTIONS = 616_767
PAPER_PRIOR_TOKENS = PAPER_PRIOR_CAPTIONS * 77


@dataclass(frozen=True)
class PaperWeights:
    """Raw closed-form weights of the paper's published configuration for one concept type."""

    prior: float  # s: scale of the prior sum over PAPER_PRIOR_TOKENS token states
    domain: tuple[tuple[int, float], ...]  # (concepts erased, w_d) points; () means no domain set
    domain_phrase: str | None  # filled into the type's templates to make the domain prompts
    ridge: float
    source: str

    def domain_at(self, n_concepts: int) -> float:
        """w_d for ``n_concepts``: log-log interpolation between the published points."""
        if not self.domain:
            return 0.0
        pts = sorted(self.domain)
        n = max(1, n_concepts)
        if n <= pts[0][0]:
            return pts[0][1]
        for (n0, w0), (n1, w1) in zip(pts, pts[1:], strict=False):
            if n <= n1:
                f = (math.log(n) - math.log(n0)) / (math.log(n1) - math.log(n0))
                return math.exp(math.log(w0) + f * (math.log(w1) - math.log(w0)))
        return pts[-1][1]


PAPER_WEIGHTS: dict[ConceptType, PaperWeights] = {
    ConceptType.CELEBRITY: PaperWeights(
        prior=1e-4,
        domain=((1, 8e3), (5, 5e4), (10, 8e4), (100, 2e5)),
        domain_phrase="a person",
        ridge=0.0,
        source="celebrity configs for 1, 5, 10 and 100 celebrities",
    ),
    ConceptType.STYLE: PaperWeights(
        prior=1e-4,
        domain=((100, 8e4),),
        domain_phrase="a person",
        ridge=0.0,
        source="artist config for 100 artists",
    ),
    ConceptType.EXPLICIT: PaperWeights(
        prior=7e-7, domain=(), domain_phrase=None, ridge=0.0, source="explicit-content config"
    ),
    # The CIFAR-10 configs use a raw ridge of 1e2 (vehicle classes such as automobile) or
    # 1e1 (animal classes such as bird) and no prior; 1e2 is the default, --cfr-ridge and
    # --fusion-ridge (per-token: 1e1 / N_f) set the other.
    ConceptType.OBJECT: PaperWeights(
        prior=0.0, domain=(), domain_phrase=None, ridge=1e2, source="CIFAR-10 object configs"
    ),
}

# Tie-break of ``profile_type``: the order of the paper's tasks.
_ORDER = [ConceptType.CELEBRITY, ConceptType.STYLE, ConceptType.EXPLICIT, ConceptType.OBJECT]


def profile_type(types: Iterable[ConceptType]) -> ConceptType:
    """The type whose configuration a run's closed forms follow: the most frequent one.

    Both closed forms are one solve over all concepts, so a run has one set of weights;
    a mixed run follows its majority type (ties: celebrity, style, explicit, object).
    """
    counts = Counter(types)
    if not counts:
        raise ValueError("no concepts")
    return max(counts, key=lambda t: (counts[t], -_ORDER.index(t)))


@dataclass(frozen=True)
class Weights:
    """Resolved weights of one closed form on the per-token-mean scale (``settings``).

    ``pooled``: the pooled block's own weights (an MMDiT's, module doc); None: these in every
    block, each block converting them with its own counts.
    """

    prior: float
    domain: float
    retain: float
    ridge: float
    pooled: Weights | None = None

    def block(self, name: str) -> Weights:
        """The weights of block ``name`` (``mace_core.text_stats.BLOCKS``)."""
        return self.pooled if name == POOLED and self.pooled is not None else replace(self, pooled=None)

    def to_dict(self) -> dict[str, Any]:
        return blocks_dict(self)


def blocks_dict(weights: Any) -> dict[str, Any]:
    """A weights dataclass with a ``pooled`` field (``Weights``, ``cfr.RawWeights``) as a dict for
    the run's report: its own fields, then the pooled block's nested (absent where None)."""
    out: dict[str, Any] = asdict(replace(weights, pooled=None))
    del out["pooled"]
    if weights.pooled is not None:
        out["pooled"] = blocks_dict(weights.pooled)
    return out


def resolve_weights(
    settings: ClosedFormSettings,
    profile: ConceptType,
    n_concepts: int,
    n_main: int,
    n_domain: int,
    scale_squared: bool = False,
    block: str = CONTEXT,
) -> Weights:
    """The weights of one block of one solve: each given setting as is, each None from the paper
    (module doc).

    ``n_main``: the block's tokens of the mapping term (aligned pairs for CFR, all concept
    tokens for the fusion); ``n_domain``: its tokens of the domain prompts; ``scale_squared``:
    CFR as in the reference experiments (s^2; the context block only); ``block``: context (SD's
    only one) or pooled.
    """
    paper = PAPER_WEIGHTS[profile]
    n_main = max(n_main, 1)
    pooled = block == POOLED
    s = paper.prior**2 if scale_squared and not pooled else paper.prior
    prior = settings.prior_weight
    if prior is None:
        prior = s * (PAPER_PRIOR_CAPTIONS if pooled else PAPER_PRIOR_TOKENS) / n_main
    domain = settings.domain_weight
    if domain is None:
        domain = s * paper.domain_at(n_concepts) * n_domain / n_main
    ridge = settings.ridge
    if ridge is None:
        ridge = paper.ridge / n_main
    return Weights(prior=prior, domain=domain, retain=settings.retain_weight, ridge=ridge)


def solve_weights(
    settings: ClosedFormSettings,
    profile: ConceptType,
    n_concepts: int,
    main: Blocked,
    domain: Blocked | None,
    scale_squared: bool = False,
) -> Weights:
    """The weights of one solve whose mapping term is ``main`` (CFR's aligned pairs, the fusion's
    concept tokens) and domain set ``domain``: every block's from its own counts (module doc)."""

    def of(block: str) -> Weights:
        n_domain = domain.rows(block) if domain is not None else 0
        return resolve_weights(
            settings, profile, n_concepts, main.rows(block), n_domain, scale_squared, block
        )

    weights = of(CONTEXT)
    return replace(weights, pooled=of(POOLED)) if POOLED in main.blocks() else weights


def domain_phrase(profile: ConceptType) -> str | None:
    """The phrase of the profile's domain set ("a person"), None when it has none."""
    return PAPER_WEIGHTS[profile].domain_phrase
