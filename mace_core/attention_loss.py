"""The attention-map loss of MACE Eq. 3."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def layer_grid(n_queries: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """Spatial (h, w) of a layer with ``n_queries`` pixels in a UNet fed ``latent_hw`` latents."""
    H, W = latent_hw
    s = math.sqrt(H * W / n_queries)
    h, w = round(H / s), round(W / s)
    if h * w != n_queries:
        raise ValueError(f"cannot map {n_queries} queries onto a {H}x{W} latent grid")
    return h, w


def attention_loss(
    probs: list[torch.Tensor],
    masks: torch.Tensor,
    token_mask: torch.Tensor,
    latent_hw: tuple[int, int],
    squared: bool = False,
) -> torch.Tensor:
    """Eq. 3 per sample: sum_l || A_l[pixels inside the mask, concept tokens] ||_F.

    probs: per layer (batch, heads, queries, tokens); masks: (batch, H, W) bool at image
    size, resized (nearest) to each layer's grid; token_mask: (batch, tokens) bool.
    ``squared`` gives the paper's squared norm, else the plain norm of the experiments.
    Returns (batch,) losses; their sum has exactly each sample's gradients.
    """
    b = masks.shape[0]
    total = torch.zeros(b, device=masks.device, dtype=torch.float32)
    tok = token_mask.to(torch.float32)[:, None, None, :]  # (b, 1, 1, tokens)
    for p, m in zip(probs, _layer_masks(probs, masks, latent_hw), strict=True):
        sel = p.float() * m * tok
        sq = sel.pow(2).sum(dim=(1, 2, 3))
        total = total + (sq if squared else (sq + 1e-12).sqrt())
    return total


def _layer_masks(
    probs: list[torch.Tensor], masks: torch.Tensor, latent_hw: tuple[int, int]
) -> list[torch.Tensor]:
    """The masks resized (nearest) to each layer's grid, as (batch, 1, queries, 1) floats."""
    b = masks.shape[0]
    cache: dict[tuple[int, int], torch.Tensor] = {}
    out = []
    for p in probs:
        grid = layer_grid(p.shape[2], latent_hw)
        if grid not in cache:
            m = F.interpolate(masks[:, None].float(), size=grid, mode="nearest")
            cache[grid] = m.view(b, 1, -1, 1)
        out.append(cache[grid])
    return out


def masked_attention_share(
    probs: list[torch.Tensor], masks: torch.Tensor, token_mask: torch.Tensor, latent_hw: tuple[int, int]
) -> torch.Tensor:
    """Per sample, the mean over layers, heads and masked queries of the attention given to
    the ``token_mask`` tokens: the attention mass that Eq. 3 lowers, in [0, 1].

    Arguments as for ``attention_loss``; a layer whose resized mask is empty counts 0.
    """
    b = masks.shape[0]
    total = torch.zeros(b, device=masks.device, dtype=torch.float32)
    tok = token_mask.to(torch.float32)[:, None, None, :]
    for p, m in zip(probs, _layer_masks(probs, masks, latent_hw), strict=True):
        heads = p.shape[1]
        inside = (p.float() * m * tok).sum(dim=(1, 2, 3))
        total = total + inside / (m.sum(dim=(1, 2, 3)) * heads).clamp(min=1)
    return total / max(len(probs), 1)
