"""Stable Diffusion 1.x: CLIP ViT-L text encoder, CLIP tokenizer padding with end-of-text.

``tiny`` is this family's: a seeded random pipeline with the real CLIP tokenizer, built
offline in about a second, for demos and tests. It runs every stage of the method; its
images are noise.
"""

from __future__ import annotations

from typing import ClassVar

from mace_core.clip_text import TINY_CLIP_TEXT, clip_tokenizer, tiny_clip_text
from mace_core.families.stable_diffusion import CLIP_DEFAULT_PAD, StableDiffusionFamily, assemble_pipeline
from mace_core.families.tiny import SD_NOISE_SCHEDULE, seeded, tiny_unet, tiny_vae


def build_tiny_pipeline(seed: int = 0, width: int | None = None):  # -> StableDiffusionPipeline
    """A seeded random SD-1.x-shaped pipeline (tiny widths), identical on every machine.
    ``width``: the text encoder's (and cross-attention's) width, default the ``tiny`` model's 32."""
    from diffusers import DPMSolverMultistepScheduler
    from transformers import CLIPTextConfig, CLIPTextModel

    text = TINY_CLIP_TEXT if width is None else tiny_clip_text(width)
    with seeded(seed):
        unet = tiny_unet(cross_attention_dim=text["hidden_size"], attention_head_dim=4)
        vae = tiny_vae((32,))
        text_encoder = CLIPTextModel(CLIPTextConfig(**text))
    scheduler = DPMSolverMultistepScheduler(num_train_timesteps=1000, **SD_NOISE_SCHEDULE)
    return assemble_pipeline(vae, text_encoder, clip_tokenizer(), unet, scheduler)


class SD1(StableDiffusionFamily):
    name: ClassVar[str] = "sd1"
    description: ClassVar[str] = (
        "sd1: a StableDiffusionPipeline whose CLIP tokenizer pads with '<|endoftext|>'"
    )
    pad_token: ClassVar[str] = CLIP_DEFAULT_PAD

    build_tiny_pipeline = staticmethod(build_tiny_pipeline)


FAMILY = SD1()
