"""Training images per concept (MACE Stage 2): the original model, fixed per-concept seeds.

Image i of a concept always comes from the same seed (derived from the concept text and
i), drawn on a CPU generator, so a concept gets the same images on any machine, in any
shard and in any batch composition (alone, with other concepts, or split into chunks).
The pipeline's dtype is the caller's choice: fp16 on CUDA is the fast path (UNet fp16
at batch 16 is ~4x faster than fp32); the initial noise is drawn on the CPU in
fp32 and cast, so the seeds mean the same noise in every dtype.
"""

from __future__ import annotations

import numpy as np
import torch

from mace_core.concepts import Concept
from mace_core.errors import MaceError
from mace_core.progress import Progress, no_progress
from mace_core.prompts import generation_prompt
from mace_core.settings import DataSettings
from mace_core.train import concept_seed


class GenerationError(MaceError):
    """The diffusion model produced unusable images (NaN / inf, e.g. fp16 overflow)."""


def image_size(pipe, settings: DataSettings) -> int:
    if settings.resolution is not None:
        return settings.resolution
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


def image_seeds(concept: Concept, settings: DataSettings) -> list[int]:
    """The seed of each of a concept's images: fixed by (settings.seed, concept, index) only."""
    base = concept_seed(settings.seed, concept, "images")
    return [(base + i) % (1 << 63) for i in range(settings.images_per_concept)]


def initial_noise(
    generators: list[torch.Generator], shape: tuple[int, int, int], dtype: torch.dtype
) -> torch.Tensor:
    """One (C, h, w) standard-normal latent per generator, drawn in fp32 on the CPU, then cast.

    The same draws diffusers makes for a list of CPU generators in fp32, so fp32 images are
    unchanged; drawing in fp32 first makes an fp16 pipeline start from the same noise.
    """
    return torch.cat([torch.randn((1, *shape), generator=g, dtype=torch.float32) for g in generators]).to(
        dtype
    )


@torch.no_grad()
def generate_images(
    pipe,
    concepts: list[Concept],
    settings: DataSettings,
    max_batch_images: int | None = None,
    progress: Progress = no_progress,
) -> list[np.ndarray]:
    """``images_per_concept`` images per concept, uint8 (N, H, W, 3); DPM-Solver + CFG.

    All images of all given concepts go through the pipeline together, in batches of at
    most ``max_batch_images`` images (None: one batch; with CFG the UNet sees twice as
    many). Every image has its own generator, so chunking changes no image.
    """
    from diffusers import DPMSolverMultistepScheduler

    if max_batch_images is not None and max_batch_images < 1:
        raise ValueError(f"max_batch_images must be >= 1 or None, got {max_batch_images}")
    if not concepts:
        return []
    if not isinstance(pipe.scheduler, DPMSolverMultistepScheduler):
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    n = settings.images_per_concept
    prompts, gens = [], []
    for c in concepts:
        prompts += [generation_prompt(c)] * n
        gens += [torch.Generator().manual_seed(s) for s in image_seeds(c, settings)]
    size = image_size(pipe, settings)
    latent_shape = (
        int(pipe.unet.config.in_channels),
        size // pipe.vae_scale_factor,
        size // pipe.vae_scale_factor,
    )
    step = max_batch_images or len(prompts)
    parts = []
    total = -(-len(prompts) // step) * settings.inference_steps  # denoising steps of all chunks
    for start in range(0, len(prompts), step):
        chunk = gens[start : start + step]
        done_before = start // step * settings.inference_steps

        def on_step(pipe, i: int, t, kwargs: dict, before: int = done_before) -> dict:
            progress("image steps", before + i + 1, total)
            return kwargs

        out = pipe(
            prompt=prompts[start : start + step],
            num_inference_steps=settings.inference_steps,
            guidance_scale=settings.guidance_scale,
            latents=initial_noise(chunk, latent_shape, pipe.unet.dtype),
            # Still passed: stochastic schedulers draw their step noise from them.
            generator=chunk,
            height=size,
            width=size,
            output_type="np",
            callback_on_step_end=on_step,
        ).images
        if not np.isfinite(out).all():
            dtype = pipe.unet.dtype
            raise GenerationError(
                f"non-finite pixels generating {prompts[start]!r} with a {dtype} pipeline"
                + (" (fp16 overflow? try float32)" if dtype == torch.float16 else "")
            )
        parts.append((np.clip(out, 0.0, 1.0) * 255).round().astype(np.uint8))
    arr = np.concatenate(parts)
    return [arr[j * n : (j + 1) * n] for j in range(len(concepts))]


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1], the VAE's input range."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
