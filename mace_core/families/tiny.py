"""What the families' tiny pipelines share: seeded construction, a small UNet and VAE, the
SD noise schedule.

Each family's ``build_tiny_pipeline`` passes only what makes its shape its own (block
layout, head counts, cross-attention width, extra conditioning); the common widths live
here once. A tiny model must be identical on every machine: it is the ``tiny`` model's
fingerprint and the reference of tests, so these defaults are part of its identity.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

# The beta schedule every SD 1.x / 2.x / XL model was trained with (and its offset). The
# 1000 training steps are every scheduler's default: SD 1.x / 2.x name them, SDXL does not,
# and a scheduler's config records which values were defaults, so each keeps its own.
SD_NOISE_SCHEDULE: dict[str, Any] = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
)

# An SD-1.x-like UNet in tiny widths: cross-attention in the outer block only.
TINY_UNET: dict[str, Any] = dict(
    block_out_channels=(32, 64),
    layers_per_block=1,
    sample_size=32,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    norm_num_groups=8,
)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Torch's CPU RNG seeded with ``seed`` inside; the caller's RNG state is restored after,
    so building a tiny model has no hidden side effect on the caller's draws."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def assemble(pipeline_class: Any, **components: Any) -> Any:
    """A pipeline of built (random) components: every model in eval mode, no progress bars."""
    for part in components.values():
        if isinstance(part, torch.nn.Module):
            part.eval()
    pipe = pipeline_class(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_unet(cross_attention_dim: int, **overrides: Any):  # -> UNet2DConditionModel
    """A random UNet2DConditionModel of ``TINY_UNET``'s shape, with a family's ``overrides``."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**{**TINY_UNET, "cross_attention_dim": cross_attention_dim, **overrides})


def tiny_vae(block_out_channels: tuple[int, ...], **overrides: Any):  # -> AutoencoderKL
    """A random AutoencoderKL with one encoder and one decoder block per width (each block
    but the last halves the image), 4 latent channels."""
    from diffusers import AutoencoderKL

    n = len(block_out_channels)
    return AutoencoderKL(
        block_out_channels=block_out_channels,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        latent_channels=4,
        norm_num_groups=8,
        **overrides,
    )
