"""Frechet Inception Distance (Heusel et al. 2017), the regular-content metric of MACE Sec. 4.

FID = ||mu_1 - mu_2||^2 + tr(S_1 + S_2 - 2 (S_1^{1/2} S_2 S_1^{1/2})^{1/2})

between Gaussian fits (mean mu, covariance S) of two feature sets. Everything is float64.
Features arrive in shards, so the fit is an additive object: ``FeatureMoments`` holds
(n, mean, centred sum of outer products) and merges exactly with Chan et al.'s pairwise
update, in any order.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mace_core.fingerprint import file_digest


@dataclass
class FeatureMoments:
    """n samples' mean (d,) and centred scatter M2 = sum (x - mean)(x - mean)^T (d, d), float64."""

    n: int
    mean: torch.Tensor
    m2: torch.Tensor

    @classmethod
    def from_features(cls, x: torch.Tensor) -> FeatureMoments:
        x = x.double().cpu()
        if x.ndim != 2:
            raise ValueError(f"features must be (N, d), got {tuple(x.shape)}")
        mean = x.mean(dim=0) if len(x) else torch.zeros(x.shape[1], dtype=torch.float64)
        xc = x - mean
        return cls(len(x), mean, xc.T @ xc)

    def __add__(self, other: FeatureMoments) -> FeatureMoments:
        # Chan, Golub & LeVeque (1979): exact merge of two samples' moments.
        if self.mean.shape != other.mean.shape:
            raise ValueError(f"feature sizes differ: {self.mean.shape[0]} vs {other.mean.shape[0]}")
        if other.n == 0:
            return self
        if self.n == 0:
            return other
        n = self.n + other.n
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.n / n)
        m2 = self.m2 + other.m2 + torch.outer(delta, delta) * (self.n * other.n / n)
        return FeatureMoments(n, mean, m2)

    def covariance(self) -> torch.Tensor:
        """Unbiased sample covariance M2 / (n - 1), as numpy.cov and pytorch-fid use."""
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 samples, got {self.n}")
        return self.m2 / (self.n - 1)


def _psd_sqrt(s: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a symmetric PSD matrix (eigenvalues clamped at 0 for rounding)."""
    vals, vecs = torch.linalg.eigh((s + s.T) / 2)
    return (vecs * vals.clamp_min(0.0).sqrt()) @ vecs.T


def trace_sqrt_product(s1: torch.Tensor, s2: torch.Tensor) -> float:
    """tr((S_1 S_2)^{1/2}) for symmetric PSD S_1, S_2.

    S_1 S_2 is similar to S_1^{1/2} S_2 S_1^{1/2}, which is symmetric PSD, so its square root's
    trace is the sum of the square roots of that matrix's (real, >= 0) eigenvalues. This avoids
    the complex parts and the ill-conditioning of a general matrix square root of S_1 S_2.
    """
    r = _psd_sqrt(s1)
    m = r @ s2 @ r
    return float(torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0.0).sqrt().sum())


def frechet_distance(mu1: torch.Tensor, s1: torch.Tensor, mu2: torch.Tensor, s2: torch.Tensor) -> float:
    """d^2 = ||mu_1 - mu_2||^2 + tr(S_1) + tr(S_2) - 2 tr((S_1^{1/2} S_2 S_1^{1/2})^{1/2}), in float64."""
    mu1, mu2, s1, s2 = (t.double() for t in (mu1, mu2, s1, s2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.shape[0], mu1.shape[0]):
        raise ValueError(
            f"shapes do not match: mu {tuple(mu1.shape)}/{tuple(mu2.shape)}, "
            f"S {tuple(s1.shape)}/{tuple(s2.shape)}"
        )
    diff = mu1 - mu2
    d2 = (
        float(diff @ diff)
        + float(torch.trace(s1))
        + float(torch.trace(s2))
        - 2.0 * trace_sqrt_product(s1, s2)
    )
    return max(d2, 0.0)  # rounding can leave -1e-12 for identical sets


def fid(a: FeatureMoments, b: FeatureMoments) -> float:
    """FID between two feature sets' Gaussian fits."""
    return frechet_distance(a.mean, a.covariance(), b.mean, b.covariance())


def moments_bytes(m: FeatureMoments, metadata: dict[str, str] | None = None) -> bytes:
    """A safetensors file of the moments (e.g. the cached reference set of an FID)."""
    from safetensors.torch import save

    tensors = {
        "n": torch.tensor([m.n], dtype=torch.int64),
        "mean": m.mean.contiguous(),
        "m2": m.m2.contiguous(),
    }
    return save(tensors, metadata=metadata or {})


def moments_from_bytes(data: bytes, what: str) -> FeatureMoments:
    from safetensors.torch import load

    from mace_core.errors import ArtefactError

    try:
        t = load(data)
        return FeatureMoments(int(t["n"][0]), t["mean"].double(), t["m2"].double())
    except Exception as e:
        raise ArtefactError(f"{what} is not a readable feature-moments file: {e}") from None


def reference_key(files: Sequence[str | Path], extractor: str, weights: str | Path | None = None) -> str:
    """Cache key of a reference image set's feature moments: the CONTENT of its images and of
    the feature extractor, never file names, sizes or dates, so a folder changed in place
    (an image replaced by one of the same size) is featurised again.

    ``extractor``: which features ("clip:<model>" or "inception"); ``weights``: the extractor's
    weights file, hashed too. The images' digests are sorted: the moments are a sum over the
    set, so neither names nor order change them (a duplicated image counts twice).
    """
    digests = sorted(file_digest(Path(f)) for f in files)
    spec = {
        "images": digests,
        "extractor": extractor,
        "weights": file_digest(Path(weights)) if weights is not None else None,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
