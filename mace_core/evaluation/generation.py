"""Images of a shard of evaluation prompts, each from its own fixed seed.

Images come from the pipeline's family (``ModelFamily.generate``, mace_core/families/base.py),
as the erase run's training images do: every image has its own CPU generator seeded from
its ``EvalPrompt.seed`` and its initial noise drawn in fp32 on the CPU, so an image is the
same whichever shard, batch or machine renders it. Prompts with the same guidance scale and
size are batched together.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from mace_core.errors import SettingError
from mace_core.evaluation.errors import EvalInputError
from mace_core.evaluation.suites import EvalPrompt
from mace_core.families import family_of_pipeline
from mace_core.options import coerce_choices, plain, setting
from mace_core.progress import Progress, no_progress
from mace_core.settings import Precision


@dataclass(frozen=True)
class GenerationSettings:
    inference_steps: int = setting(30, "DPM-Solver steps per image.", min=1)
    # Used when a prompt has no guidance of its own (I2P has).
    guidance_scale: float = setting(7.5, "CFG scale (an I2P row's own sd_guidance_scale wins).", min=0.0)
    resolution: int | None = setting(
        None, "Image size for every prompt (default: the CSV's, else the model's).", min=8
    )
    # The UNet sees twice as many with CFG.
    batch_size: int = setting(8, "Images per pipeline call.", min=1)
    # fp32 by default: the numbers are the model's, not its fp16 rounding's.
    precision: Precision = setting(
        Precision.FP32, "auto: fp16 pipeline on CUDA, fp32 on CPU; fp32: fp32 everywhere."
    )

    def __post_init__(self) -> None:
        coerce_choices(self, {"precision": (Precision, "precision")})
        if self.inference_steps < 1:
            raise SettingError(f"inference_steps must be >= 1, got {self.inference_steps}")
        if self.batch_size < 1:
            raise SettingError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise SettingError(f"resolution must be a positive multiple of 8, got {self.resolution}")

    def to_dict(self) -> dict:
        return plain(asdict(self))


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
