"""Images of a shard of evaluation prompts, each from its own fixed seed.

Images come from the pipeline's family (``ModelFamily.generate``, mace_core/families/base.py),
as the erase run's training images do: every image has its own CPU generator seeded from
its ``EvalPrompt.seed`` and its initial noise drawn in fp32 on the CPU, so an image is the
same whichever shard, batch or machine renders it. Prompts with the same guidance scale and
size are batched together.
"""

from __future__ import annotations

import numpy as np
import torch

from mace_core.evaluation.errors import EvalInputError
from mace_core.evaluation.settings import GenerationSettings
from mace_core.evaluation.suites import EvalPrompt
from mace_core.families import family_of_pipeline
from mace_core.progress import Progress, no_progress


def native_size(pipe) -> int:
    return family_of_pipeline(pipe).native_size(pipe)


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
def generate_eval_images(
    pipe, prompts: list[EvalPrompt], settings: GenerationSettings, progress: Progress = no_progress
) -> list[np.ndarray]:
    """One uint8 (H, W, 3) image per prompt, in the order given; ``progress`` per image."""
    family = family_of_pipeline(pipe)
    # Batch prompts that share guidance and size; remember where each image goes.
    batches: dict[tuple[float, int, int], list[int]] = {}
    for i, p in enumerate(prompts):
        g = p.guidance if p.guidance is not None else settings.guidance_scale
        batches.setdefault((g, *image_shape(pipe, p, settings)), []).append(i)
    out: list[np.ndarray | None] = [None] * len(prompts)
    for (guidance, h, w), idx in batches.items():
        for start in range(0, len(idx), settings.batch_size):
            chunk = idx[start : start + settings.batch_size]
            images = family.generate(
                pipe,
                [prompts[i].prompt for i in chunk],
                [prompts[i].seed for i in chunk],
                h,
                w,
                settings.inference_steps,
                guidance,
            )
            for i, im in zip(chunk, images, strict=True):
                out[i] = im
            progress("images", sum(im is not None for im in out), len(prompts))
    return [im for im in out if im is not None]
