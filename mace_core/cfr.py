"""Closed-form cross-attention refinement (CFR, MACE Eq. 1-2).

    min_W'  sum_i ||W' e_f_i - W e_g_i||^2 + a sum_p ||W' e_p - W e_p||^2 + r ||W' - W||^2
    W' = W (X + a C_p + r I)(C + a C_p + r I)^-1  =  W M

Every term is W times a d x d matrix, so ONE matrix M serves all attn2 to_k / to_v
projections. Besides the prior C_p the preservation terms include the domain set C_d
and the user's retained set C_r, each with its weight. Weights are on the per-token
mean scale (``mace_core.settings``), resolved by ``mace_core.closed_form_weights``.

An MMDiT's statistics are block-diagonal in [context | pooled] (``mace_core.text_stats``): the
solve is one least-squares problem per block, and each block's weights are converted to raw
with that block's own token counts (``regularise``); SD's space is one block, solved as ever.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from mace_core.closed_form_weights import Weights, blocks_dict
from mace_core.errors import ArtefactError
from mace_core.text_stats import CONTEXT, POOLED, Blocked, MappingStats, SecondMoment

# The smallest reciprocal condition number a solve accepts: token states are float32
# (relative precision ~6e-8), so below this the solve amplifies their rounding into the
# result (the "noise images" of a singular system). A ridge of 0 on states that lie in a
# hyperplane (random LayerNorm weights) needs this floor.
MIN_RCOND = 1e-8


@dataclass(frozen=True)
class Preservation:
    """Second moments of the preservation terms: prior C_p, domain C_d, retained C_r."""

    prior: SecondMoment | None = None
    domain: SecondMoment | None = None
    retain: SecondMoment | None = None

    def tokens(self, block: str | None = None) -> dict[str, int]:
        """Rows of each term: all of them, or those of ``block``."""
        return {
            k: (0 if m is None else m.n if block is None else m.rows(block)) for k, m in self.terms().items()
        }

    def terms(self) -> dict[str, SecondMoment | None]:
        return {"prior": self.prior, "domain": self.domain, "retain": self.retain}


@dataclass(frozen=True)
class RawWeights:
    """The weights as applied to the plain sums (the paper's scale), for the report.

    ``ridge_floor``: ridge added beyond ``ridge`` because the system was too close to
    singular (``MIN_RCOND``); 0 when the requested weights solve as they are.
    """

    prior: float
    domain: float
    retain: float
    ridge: float
    ridge_floor: float = 0.0
    pooled: RawWeights | None = None  # the pooled block's (an MMDiT's); None: no such block

    def to_dict(self) -> dict[str, Any]:
        return blocks_dict(self)


def raw_weights(weights: Weights, n_main: int, terms: Preservation, block: str | None = None) -> RawWeights:
    """Per-token-mean weights -> raw weights on the sums (``mace_core.settings``): ``n_main``
    rows of the mapping term and each term's rows, all of them or those of ``block``."""
    n_main = max(n_main, 1)
    rows = terms.tokens(block)

    def raw(w: float, name: str) -> float:
        return w * n_main / rows[name] if rows[name] else 0.0

    return RawWeights(
        prior=raw(weights.prior, "prior"),
        domain=raw(weights.domain, "domain"),
        retain=raw(weights.retain, "retain"),
        ridge=weights.ridge * n_main,
    )


def preservation_sum(d: int, terms: Preservation, raw: RawWeights) -> torch.Tensor:
    """a C_p + w C_d + q C_r (raw weights), float64 d x d; the ridge is not included."""
    R = torch.zeros(d, d, dtype=torch.float64)
    for name, m in terms.terms().items():
        w = getattr(raw, name)
        if m is not None and w:
            R = R + w * m.C
    return R


def ridge_floor(A: torch.Tensor) -> float:
    """The smallest ridge delta with rcond(A + delta I) >= MIN_RCOND (0 if A already is)."""
    lam = torch.linalg.eigvalsh(A)
    lo, hi = float(lam[0]), float(lam[-1])
    if hi <= 0:  # nothing at all: any positive ridge solves; pick 1
        return 1.0
    need = (MIN_RCOND * hi - lo) / (1 - MIN_RCOND)
    return max(0.0, need)


def regularise(
    main: Blocked, weights: Weights, terms: Preservation
) -> tuple[torch.Tensor, float | torch.Tensor, RawWeights]:
    """The preservation sum R (``preservation_sum``) and the ridge r that both closed forms
    add to the second moment C of their mapping term ``main``: r is the requested ridge, raised
    to ``ridge_floor`` when C + R + r I is too close to singular. Returns (R, r, raw weights
    with the floor); ``r * I`` is the ridge matrix (r is a float, or per column with blocks).

    With a pooled block, R and r are built block by block, each block's weights
    (``weights.block``) converted with its own rows: the solve is one per block (module doc)."""
    d = main.C.shape[0]
    if main.pooled is None:
        raw = raw_weights(weights, main.n, terms)
        R = preservation_sum(d, terms, raw)
        ridge: float | torch.Tensor = raw.ridge
    else:
        R, ridge, raw = _block_sums(main, weights, terms)
    floor = ridge_floor(main.C + R + ridge * torch.eye(d, dtype=torch.float64))
    if floor:
        pooled = replace(raw.pooled, ridge_floor=floor) if raw.pooled is not None else None
        raw = replace(raw, ridge_floor=floor, pooled=pooled)
    return R, ridge + floor, raw


def _block_sums(
    main: Blocked, weights: Weights, terms: Preservation
) -> tuple[torch.Tensor, torch.Tensor, RawWeights]:
    """``regularise``'s R and per-column ridge for a [context | pooled] space, block by block."""
    d = main.C.shape[0]
    width = main.pooled.width if main.pooled is not None else 0
    for name, m in terms.terms().items():
        if m is not None and (m.pooled is None or m.pooled.width != width):
            raise ArtefactError(
                f"the {name} statistics are not laid out as the concepts' ([context | pooled])"
            )
    R = torch.zeros(d, d, dtype=torch.float64)
    ridge = torch.zeros(d, dtype=torch.float64)
    raws = {}
    for block in (CONTEXT, POOLED):
        raw = raws[block] = raw_weights(weights.block(block), main.rows(block), terms, block)
        cols = main.columns(block)
        for name, m in terms.terms().items():
            w = getattr(raw, name)
            if m is not None and w:
                R[cols, cols] += w * m.C[cols, cols]
        ridge[cols] = raw.ridge
    return R, ridge, replace(raws[CONTEXT], pooled=raws[POOLED])


def solve_right(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """X with X A = B for a symmetric A (float64), by ``linalg.solve``, never an inverse."""
    return torch.linalg.solve(A, B.T).T


def cfr_matrix(stats: MappingStats, weights: Weights, terms: Preservation) -> tuple[torch.Tensor, RawWeights]:
    """Eq. 2: M = (X + R + r I)(C + R + r I)^-1, R = a C_p + w C_d + q C_r, float64 (d x d).

    A ridge too small to solve (r = 0 on a singular system) is raised to the floor of
    ``ridge_floor`` and reported in the returned ``RawWeights``; never NaN.
    """
    R, ridge, raw = regularise(stats, weights, terms)
    rI = ridge * torch.eye(stats.C.shape[0], dtype=torch.float64)
    M = solve_right(stats.C + R + rI, stats.X + R + rI)  # left factor symmetric positive definite
    return M, raw


def apply_cfr(weights: dict[str, torch.Tensor], M: torch.Tensor) -> dict[str, torch.Tensor]:
    """W' = W M for every projection (Eq. 2), computed in float64, returned as float32."""
    return {k: (W.double() @ M).float() for k, W in weights.items()}
