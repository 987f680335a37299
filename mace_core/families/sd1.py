"""Stable Diffusion 1.x: CLIP ViT-L text encoder, CLIP tokenizer padding with end-of-text.

``tiny`` is this family's: a seeded random pipeline with the real CLIP tokenizer, built
offline in about a second, for demos and tests. It runs every stage of the method; its
images are noise.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from mace_core.clip_text import TINY_CLIP_TEXT, clip_tokenizer
from mace_core.families.stable_diffusion import CLIP_DEFAULT_PAD, StableDiffusionFamily, assemble_pipeline


def build_tiny_pipeline(seed: int = 0):  # -> StableDiffusionPipeline
    """A seeded random SD-1.x-shaped pipeline (tiny widths), identical on every machine."""
    from diffusers import (
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    # fork_rng keeps the caller's global RNG untouched (no hidden side effects).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=1,
            sample_size=32,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=4,
            norm_num_groups=8,
        )
        vae = AutoencoderKL(
            block_out_channels=(32,),
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",),
            up_block_types=("UpDecoderBlock2D",),
            latent_channels=4,
            norm_num_groups=8,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_CLIP_TEXT))
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
    )
    return assemble_pipeline(vae, text_encoder, clip_tokenizer(), unet, scheduler)


class SD1(StableDiffusionFamily):
    name: ClassVar[str] = "sd1"
    description: ClassVar[str] = (
        "sd1: a StableDiffusionPipeline whose CLIP tokenizer pads with '<|endoftext|>'"
    )
    pad_token: ClassVar[str] = CLIP_DEFAULT_PAD
    pad_token_id: ClassVar[int] = 49407

    def build_tiny_pipeline(self, seed: int = 0) -> Any:
        return build_tiny_pipeline(seed)


FAMILY = SD1()
