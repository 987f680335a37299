"""How a training latent is noised at timestep t, and the time the denoiser is told.

LoRA training (Eq. 3) and the attention-mass probe draw an integer timestep t in
[0, T-1] (CFIS, Eq. 5, or uniform) and noise a latent to it:

- SD's UNets (DDPM): x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) noise, a_t the cumulative alpha
  of the model's own training schedule; the UNet is told t.
- FLUX.1 / SD 3.x (rectified flow): x_t = (1 - s_t) x_0 + s_t noise with s_t the noise level
  of equal signal-to-noise ratio to SD's DDPM timestep t (``mace_core.cfis.flow_sigmas``),
  so Eq. 5's window means the same noise levels on every family; the transformer is told
  s_t on its own scale (FLUX: s_t, SD 3.x: 1000 s_t).

A ``DDPMScheduler`` (what SD families train with) is accepted where a schedule is expected.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


def noised(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """x_t ~ q(x_t | x_0) = sqrt(a_t) x_0 + sqrt(1 - a_t) noise, for a batch of (x0, t, noise)."""
    a = alphas[t].view(-1, *([1] * (x0.ndim - 1)))
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


class NoiseSchedule(Protocol):
    num_timesteps: int

    def to(self, device: torch.device) -> NoiseSchedule: ...

    def noised(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor: ...

    def model_time(self, t: torch.Tensor) -> torch.Tensor: ...


class DDPMSchedule:
    """SD's: cumulative alphas of the UNet's training schedule; the UNet takes t itself."""

    def __init__(self, alphas_cumprod: torch.Tensor) -> None:
        self.alphas = alphas_cumprod
        self.num_timesteps = len(alphas_cumprod)

    def to(self, device: torch.device) -> DDPMSchedule:
        return DDPMSchedule(self.alphas.to(device))

    def noised(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return noised(x0, t, noise, self.alphas)

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        return t


class FlowSchedule:
    """Rectified flow: x_t = (1 - s_t) x_0 + s_t noise; the transformer takes ``time_scale`` s_t."""

    def __init__(self, sigmas: torch.Tensor, time_scale: float) -> None:
        self.sigmas = sigmas
        self.time_scale = time_scale
        self.num_timesteps = len(sigmas)

    def to(self, device: torch.device) -> FlowSchedule:
        return FlowSchedule(self.sigmas.to(device), self.time_scale)

    def noised(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        s = self.sigmas[t].view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
        return (1 - s) * x0 + s * noise

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        return self.sigmas[t] * self.time_scale


def training_schedule(scheduler: Any) -> NoiseSchedule:
    """A schedule as is, or a DDPM scheduler's cumulative alphas as a ``DDPMSchedule``."""
    if isinstance(scheduler, (DDPMSchedule, FlowSchedule)):
        return scheduler
    return DDPMSchedule(scheduler.alphas_cumprod)
