"""Images of a shard of evaluation prompts, each from its own fixed seed.

Every image has its own CPU generator seeded from its ``EvalPrompt.seed`` and its initial
noise drawn in fp32 on the CPU (``mace_core.datagen.initial_noise``), so an image is the same
whichever shard, batch or machine renders it. Prompts with the same guidance scale and size
are batched together; DPM-Solver as in the erase run's data generation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from mace_core.datagen import GenerationError, initial_noise
from mace_core.evaluation.errors import EvalInputError
from mace_core.evaluation.suites import EvalPrompt
from mace_core.progress import Progress, no_progress


@dataclass(frozen=True)
class GenerationSettings:
    inference_steps: int = 30
    guidance_scale: float = 7.5  # used when a prompt has no guidance of its own (I2P has)
    resolution: int | None = None  # overrides every size; None: the prompt's size, else the model's
    batch_size: int = 8  # images per pipeline call (the UNet sees twice as many with CFG)
    fp16: bool = False  # half precision on CUDA (ignored on CPU)

    def __post_init__(self) -> None:
        if self.inference_steps < 1:
            raise ValueError(f"inference_steps must be >= 1, got {self.inference_steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise ValueError(f"resolution must be a positive multiple of 8, got {self.resolution}")

    def to_dict(self) -> dict:
        return asdict(self)


def native_size(pipe) -> int:
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


def image_shape(pipe, p: EvalPrompt, settings: GenerationSettings) -> tuple[int, int]:
    """(height, width): --resolution, else the prompt's own size (I2P), else the model's."""
    if settings.resolution is not None:
        return settings.resolution, settings.resolution
    native = native_size(pipe)
    h, w = p.height or native, p.width or native
    if h % 8 or w % 8:
        raise EvalInputError(f"prompt {p.id}: image size {w}x{h} is not a multiple of 8")
    return h, w


@torch.no_grad()
def generate_images(
    pipe, prompts: list[EvalPrompt], settings: GenerationSettings, progress: Progress = no_progress
) -> list[np.ndarray]:
    """One uint8 (H, W, 3) image per prompt, in the order given; ``progress`` per image."""
    from diffusers import DPMSolverMultistepScheduler

    if not isinstance(pipe.scheduler, DPMSolverMultistepScheduler):
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    # Batch prompts that share guidance and size; remember where each image goes.
    batches: dict[tuple[float, int, int], list[int]] = {}
    for i, p in enumerate(prompts):
        g = p.guidance if p.guidance is not None else settings.guidance_scale
        batches.setdefault((g, *image_shape(pipe, p, settings)), []).append(i)
    out: list[np.ndarray | None] = [None] * len(prompts)
    channels, scale = int(pipe.unet.config.in_channels), int(pipe.vae_scale_factor)
    for (guidance, h, w), idx in batches.items():
        for start in range(0, len(idx), settings.batch_size):
            chunk = idx[start : start + settings.batch_size]
            gens = [torch.Generator().manual_seed(prompts[i].seed) for i in chunk]
            images = pipe(
                prompt=[prompts[i].prompt for i in chunk],
                num_inference_steps=settings.inference_steps,
                guidance_scale=guidance,
                latents=initial_noise(gens, (channels, h // scale, w // scale), pipe.unet.dtype),
                generator=gens,  # stochastic schedulers draw their step noise from them
                height=h,
                width=w,
                output_type="np",
            ).images
            if not np.isfinite(images).all():
                raise GenerationError(
                    f"non-finite pixels for prompt {prompts[chunk[0]].id} with a {pipe.unet.dtype} pipeline"
                    + (" (fp16 overflow? drop --fp16)" if pipe.unet.dtype == torch.float16 else "")
                )
            for i, im in zip(chunk, images, strict=True):
                out[i] = (np.clip(im, 0.0, 1.0) * 255).round().astype(np.uint8)
            progress("images", sum(im is not None for im in out), len(prompts))
    return [im for im in out if im is not None]
