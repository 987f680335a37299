"""Closed-form cross-attention refinement (CFR, MACE Eq. 1-2).

    min_W'  sum_i ||W' e_f_i - W e_g_i||^2 + a sum_p ||W' e_p - W e_p||^2 + r ||W' - W||^2
    W' = W (X + a C_p + r I)(C + a C_p + r I)^-1  =  W M

Every term is W times a d x d matrix, so ONE matrix M serves all attn2 to_k / to_v
projections. Weights are on the per-token mean scale (see ``mace_core.settings``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mace_core.settings import ClosedFormSettings
from mace_core.text_stats import MappingStats, SecondMoment


@dataclass(frozen=True)
class RawWeights:
    """The weights as applied to the plain sums (the paper's scale), for the report."""

    prior: float
    domain: float
    ridge: float

    def to_dict(self) -> dict[str, float]:
        return {"prior": self.prior, "domain": self.domain, "ridge": self.ridge}


def raw_weights(
    settings: ClosedFormSettings, n_main: int, prior: SecondMoment | None, domain: SecondMoment | None
) -> RawWeights:
    """Per-token-mean weights -> raw weights on the sums (``settings`` docstring)."""
    n_main = max(n_main, 1)
    a = settings.prior_weight * n_main / prior.n if prior is not None and prior.n else 0.0
    w = (
        settings.prior_weight * settings.domain_weight * n_main / domain.n
        if domain is not None and domain.n
        else 0.0
    )
    return RawWeights(prior=a, domain=w, ridge=settings.ridge * n_main)


def _regulariser(
    d: int, prior: SecondMoment | None, domain: SecondMoment | None, raw: RawWeights
) -> torch.Tensor:
    R = raw.ridge * torch.eye(d, dtype=torch.float64)
    if prior is not None and raw.prior:
        R = R + raw.prior * prior.C
    if domain is not None and raw.domain:
        R = R + raw.domain * domain.C
    return R


def cfr_matrix(
    stats: MappingStats,
    settings: ClosedFormSettings,
    prior: SecondMoment | None = None,
    domain: SecondMoment | None = None,
) -> tuple[torch.Tensor, RawWeights]:
    """Eq. 2: M = (X + a C_p + w C_d + r I)(C + a C_p + w C_d + r I)^-1, float64 (d x d).

    Solved with ``linalg.solve`` on the symmetric right factor, never an explicit inverse.
    """
    d = stats.C.shape[0]
    raw = raw_weights(settings, stats.n, prior, domain)
    R = _regulariser(d, prior, domain, raw)
    A = stats.C + R  # symmetric positive (semi)definite; r > 0 makes it definite
    B = stats.X + R
    # M A = B  <=>  A M^T = B^T  (A symmetric)
    M = torch.linalg.solve(A, B.T).T
    return M, raw


def apply_cfr(weights: dict[str, torch.Tensor], M: torch.Tensor) -> dict[str, torch.Tensor]:
    """W' = W M for every projection (Eq. 2), computed in float64, returned as float32."""
    return {k: (W.double() @ M).float() for k, W in weights.items()}
