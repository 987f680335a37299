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


# The DDPM schedule of the paper's model (SD v1.4: scaled-linear betas, 1000 steps): Eq. 5's
# t1, t2 are timesteps of it.
SD_BETA_START, SD_BETA_END = 0.00085, 0.012


def flow_sigmas(num_timesteps: int = 1000) -> torch.Tensor:
    """For every DDPM timestep t of SD's schedule, the rectified-flow noise level s_t with the
    same signal-to-noise ratio: x_t = (1 - s) x_0 + s n has SNR ((1 - s) / s)^2, the DDPM
    x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) n has a_t / (1 - a_t), so
    s_t = sqrt(1 - a_t) / (sqrt(a_t) + sqrt(1 - a_t)).

    This is how CFIS (Eq. 5) carries over to FLUX.1 / SD 3.x: t is drawn from Eq. 5's
    density exactly as for SD and the latent is noised to s_t, so the window [t1, t2]
    = [200, 400] is the same band of noise levels, s in about [0.36, 0.54] (float32, (T,)).
    """
    betas = torch.linspace(SD_BETA_START**0.5, SD_BETA_END**0.5, num_timesteps, dtype=torch.float64) ** 2
    a = torch.cumprod(1 - betas, dim=0)
    return ((1 - a).sqrt() / (a.sqrt() + (1 - a).sqrt())).float()
