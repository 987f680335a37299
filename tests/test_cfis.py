"""CFIS timestep sampling follows Eq. 5."""

from __future__ import annotations

import torch

from mace_core.cfis import cfis_density, sample_timesteps


def test_cfis_samples_follow_eq5():
    g = torch.Generator().manual_seed(0)
    t = sample_timesteps(200_000, g, cfis=True)
    assert t.dtype == torch.int64
    assert int(t.min()) >= 0 and int(t.max()) <= 999
    inside = ((t >= 200) & (t <= 400)).float().mean().item()
    # The density is a smoothed box on [200, 400]: about 86% of its mass lies inside.
    assert inside > 0.8
    assert ((t < 100) | (t > 500)).float().mean().item() < 0.01
    # Empirical CDF against Eq. 5's CDF.
    p = cfis_density()
    emp = torch.bincount(t, minlength=1000).double() / t.numel()
    assert (emp.cumsum(0) - p.cumsum(0)).abs().max().item() < 0.01


def test_cfis_density_shape():
    p = cfis_density()
    assert p.shape == (1000,) and abs(p.sum().item() - 1) < 1e-12 and (p > 0).all()
    assert int(p.argmax()) in range(280, 321)  # peak at the centre of [t1, t2]
    assert p[300] > 10 * p[150] and p[300] > 10 * p[450]


def test_uniform_when_cfis_off():
    g = torch.Generator().manual_seed(0)
    t = sample_timesteps(100_000, g, cfis=False)
    assert ((t >= 200) & (t <= 400)).float().mean().item() < 0.25
    assert int(t.min()) >= 0 and int(t.max()) <= 999
