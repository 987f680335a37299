"""Concept-focal importance sampling of timesteps (CFIS, MACE Eq. 5)."""

from __future__ import annotations

import torch


def cfis_density(
    t1: int = 200, t2: int = 400, gamma: float = 0.05, num_timesteps: int = 1000
) -> torch.Tensor:
    """Eq. 5: p(t) proportional to sigmoid(g (t - t1)) - sigmoid(g (t - t2)), t = 0 .. T-1.

    Mass concentrates on [t1, t2], the late, concept-defining part of sampling, leaving
    the early (high-t) trajectory that neighbouring concepts share untouched.
    """
    t = torch.arange(num_timesteps, dtype=torch.float64)
    p = torch.sigmoid(gamma * (t - t1)) - torch.sigmoid(gamma * (t - t2))
    return p / p.sum()


def sample_timesteps(
    n: int,
    generator: torch.Generator,
    cfis: bool = True,
    t1: int = 200,
    t2: int = 400,
    gamma: float = 0.05,
    num_timesteps: int = 1000,
) -> torch.Tensor:
    """n integer timesteps in [0, T-1]: CFIS (Eq. 5) or uniform when ``cfis`` is off."""
    if not cfis:
        return torch.randint(0, num_timesteps, (n,), generator=generator)
    return torch.multinomial(
        cfis_density(t1, t2, gamma, num_timesteps), n, replacement=True, generator=generator
    )
