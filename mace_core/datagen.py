"""Training images per concept (MACE Stage 2): the original model, fixed per-concept seeds.

Image i of a concept always comes from the same seed (derived from the concept text and
i), drawn on a CPU generator, so a concept gets the same images on any machine, in any
shard and in any batch composition (alone, with other concepts, or split into chunks).
The pipeline's dtype is the caller's choice: fp16 on CUDA is the fast path (UNet fp16
at batch 16 is ~4x faster than fp32); the initial noise is drawn on the CPU in
fp32 and cast (``mace_core.families.base.initial_noise``), so the seeds mean the same
noise in every dtype.
"""

from __future__ import annotations

import numpy as np
import torch

from mace_core.concepts import Concept
from mace_core.families import family_of_pipeline
from mace_core.progress import Progress, no_progress
from mace_core.prompts import generation_prompt
from mace_core.settings import DataSettings
from mace_core.train import concept_seed


def image_size(pipe, settings: DataSettings) -> int:
    if settings.resolution is not None:
        return settings.resolution
    return family_of_pipeline(pipe).native_size(pipe)


def image_seeds(concept: Concept, settings: DataSettings) -> list[int]:
    """The seed of each of a concept's images: fixed by (settings.seed, concept, index) only."""
    base = concept_seed(settings.seed, concept, "images")
    return [(base + i) % (1 << 63) for i in range(settings.images_per_concept)]


@torch.no_grad()
def generate_images(
    pipe,
    concepts: list[Concept],
    settings: DataSettings,
    max_batch_images: int | None = None,
    progress: Progress = no_progress,
) -> list[np.ndarray]:
    """``images_per_concept`` images per concept, uint8 (N, H, W, 3); DPM-Solver + CFG
    through the pipeline's family (``ModelFamily.generate``, mace_core/families/base.py).

    All images of all given concepts go through the pipeline together, in batches of at
    most ``max_batch_images`` images (None: one batch; with CFG the UNet sees twice as
    many). Every image has its own seed, so chunking changes no image.
    """
    if max_batch_images is not None and max_batch_images < 1:
        raise ValueError(f"max_batch_images must be >= 1 or None, got {max_batch_images}")
    if not concepts:
        return []
    family = family_of_pipeline(pipe)
    n = settings.images_per_concept
    prompts, seeds = [], []
    for c in concepts:
        prompts += [generation_prompt(c)] * n
        seeds += image_seeds(c, settings)
    size = image_size(pipe, settings)
    step = max_batch_images or len(prompts)
    parts = []
    total = -(-len(prompts) // step) * settings.inference_steps  # denoising steps of all chunks
    for start in range(0, len(prompts), step):
        done_before = start // step * settings.inference_steps

        def on_step(i: int, before: int = done_before) -> None:
            progress("image steps", before + i + 1, total)

        chunk = slice(start, start + step)
        parts.append(
            family.generate(
                pipe,
                prompts[chunk],
                seeds[chunk],
                size,
                size,
                settings.inference_steps,
                settings.guidance_scale,
                on_step,
            )
        )
    arr = np.concatenate(parts)
    return [arr[j * n : (j + 1) * n] for j in range(len(concepts))]


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1], the VAE's input range."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
