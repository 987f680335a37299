"""Training images per concept (MACE Stage 2): the original model, fixed per-concept seeds.

Image i of a concept always comes from the same seed (derived from the concept text and
i), drawn on a CPU generator, so a concept gets the same images on any machine, in any
shard and in any batch composition.
"""

from __future__ import annotations

import numpy as np
import torch

from mace_core.concepts import Concept
from mace_core.prompts import generation_prompt
from mace_core.settings import DataSettings
from mace_core.train import concept_seed


def image_size(pipe, settings: DataSettings) -> int:
    if settings.resolution is not None:
        return settings.resolution
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


@torch.no_grad()
def generate_images(pipe, concepts: list[Concept], settings: DataSettings) -> list[np.ndarray]:
    """``images_per_concept`` images per concept, uint8 (N, H, W, 3); DPM-Solver + CFG.

    All images of all given concepts go through the pipeline in one batch.
    """
    from diffusers import DPMSolverMultistepScheduler

    if not isinstance(pipe.scheduler, DPMSolverMultistepScheduler):
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    n = settings.images_per_concept
    prompts, gens = [], []
    for c in concepts:
        base = concept_seed(settings.seed, c, "images")
        for i in range(n):
            prompts.append(generation_prompt(c))
            gens.append(torch.Generator().manual_seed((base + i) % (1 << 63)))
    size = image_size(pipe, settings)
    out = pipe(
        prompt=prompts,
        num_inference_steps=settings.inference_steps,
        guidance_scale=settings.guidance_scale,
        generator=gens,
        height=size,
        width=size,
        output_type="np",
    ).images
    arr = (np.clip(out, 0.0, 1.0) * 255).round().astype(np.uint8)
    return [arr[j * n : (j + 1) * n] for j in range(len(concepts))]


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1], the VAE's input range."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
