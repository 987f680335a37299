"""Stable Diffusion 2.x: OpenCLIP ViT-H text encoder, tokenizer padding with '!' (id 0).

Its UNet's transformers project with linear layers (``use_linear_projection``), its
cross-attention takes the text encoder's width (1024), and the 768 px models predict v
(``prediction_type="v_prediction"`` in the scheduler config), which generation keeps.
Loading and prompts are those of every StableDiffusionPipeline (``stable_diffusion.py``).
"""

from __future__ import annotations

from typing import ClassVar

from mace_core.clip_text import clip_tokenizer, tiny_clip_text
from mace_core.families.stable_diffusion import StableDiffusionFamily, assemble_pipeline
from mace_core.families.tiny import SD_NOISE_SCHEDULE, seeded, tiny_unet, tiny_vae

PAD_TOKEN = "!"  # OpenCLIP pads with token 0, which is '!' in CLIP's vocabulary

# What SD 2.x's text encoder config has of its own: OpenCLIP's GELU, and the bos/eos/pad ids
# of SD 2.x's own config.json (the tokenizer's are 49406/49407/0); CLIPTextModel uses them
# only for its pooled output, which MACE never reads.
SD2_TEXT = dict(hidden_act="gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1)
TINY_SD2_TEXT = tiny_clip_text(64, **SD2_TEXT)


def build_tiny_pipeline(seed: int = 0, width: int | None = None):  # -> StableDiffusionPipeline
    """A seeded random SD-2.x-shaped pipeline (tiny widths, offline), identical on every machine.

    Like SD 2.1 (768 px): linear-projection transformers with per-block head counts,
    cross-attention as wide as the GELU text encoder, a VAE that halves the image, and a
    v-prediction DDIM scheduler (generation switches to DPM-Solver, keeping v). ``width``:
    the text encoder's (and cross-attention's) width, default 64.
    """
    from diffusers import DDIMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel

    text = TINY_SD2_TEXT if width is None else tiny_clip_text(width, **SD2_TEXT)
    with seeded(seed):
        unet = tiny_unet(
            cross_attention_dim=text["hidden_size"],
            sample_size=16,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            upcast_attention=True,
        )
        vae = tiny_vae((16, 32))
        text_encoder = CLIPTextModel(CLIPTextConfig(**text))
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        **SD_NOISE_SCHEDULE,
        clip_sample=False,
        set_alpha_to_one=False,
        prediction_type="v_prediction",
    )
    return assemble_pipeline(vae, text_encoder, clip_tokenizer(pad_token=PAD_TOKEN), unet, scheduler)


class SD2(StableDiffusionFamily):
    name: ClassVar[str] = "sd2"
    description: ClassVar[str] = "sd2: a StableDiffusionPipeline whose OpenCLIP tokenizer pads with '!'"
    pad_token: ClassVar[str] = PAD_TOKEN

    build_tiny_pipeline = staticmethod(build_tiny_pipeline)


FAMILY = SD2()
