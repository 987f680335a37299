"""Stable Diffusion 3.x (3.0, 3.5): a StableDiffusion3Pipeline, CLIP-L + CLIP-G + T5, MMDiT.

The joint context is SD 3.x's sequence: the 77 CLIP positions (the penultimate states of
CLIP-L and CLIP-G side by side, 768 + 1280, zero-padded to T5's 4096), then the T5 positions
(256, the pipeline's default ``max_sequence_length``, capped by the tokenizer's); the pooled
embedding is both CLIPs' projected embeddings side by side (2048). Both enter the transformer
through the edited projections of ``mmdit.py``. Two segments: CLIP (start token,
<|endoftext|>, padded with end-of-text by CLIP-L and '!' by CLIP-G, which must agree on the
length as in SDXL) and T5 (no start token, </s>, <pad> = 0).

SD 3.5's dual-attention blocks have a self-attention named ``attn2``: image tokens only,
nothing MACE edits (the projections are declared here, not found by name).

Generation: classifier-free guidance with the empty negative prompt, the pipeline's own
FlowMatchEuler scheduler.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from mace_core.clip_text import clip_tokenizer, tiny_clip_text
from mace_core.families.base import Conditioning, TextSide
from mace_core.families.mmdit import MMDiTEncoder, MMDiTFamily, Segment, t5_length, tokenizer_ids
from mace_core.families.sdxl import PAD_TOKEN_2, two_clip_ids
from mace_core.families.stable_diffusion import CLIP_DEFAULT_PAD
from mace_core.families.tiny import assemble, seeded, tiny_vae
from mace_core.t5_text import t5_tokenizer, tiny_t5

T5_SEQUENCE_LENGTH = 256  # StableDiffusion3Pipeline's default max_sequence_length


TINY_SEQUENCE_LENGTH = 24


class SD3TextEncoder(MMDiTEncoder):
    """CLIP-L, CLIP-G and T5 of a StableDiffusion3Pipeline, used in no-grad batches."""

    def __init__(self, tokenizers, encoders, device: torch.device, batch_size: int = 64) -> None:
        self.tokenizers, self.encoders = tokenizers, encoders
        self.device = device
        self.batch_size = batch_size
        clip_len = int(tokenizers[0].model_max_length)
        self.max_length = t5_length(tokenizers[2], T5_SEQUENCE_LENGTH)
        self.segments = [
            Segment("CLIP", 0, clip_len, self.clip_ids, start_token=True),
            Segment("T5", clip_len, self.max_length, tokenizer_ids(tokenizers[2]), start_token=False),
        ]
        self.limits = self.segments
        self.joint = int(encoders[2].config.d_model)
        self.pooled_width = sum(int(e.config.projection_dim) for e in encoders[:2])

    def clip_ids(self, prompt: str) -> list[int]:
        """CLIP-L's ids; CLIP-G's agree but for padding ('!' is its pad token, kept whole)."""
        return two_clip_ids(self.tokenizers, prompt, "SD 3.x's two CLIP tokenizers")

    def ids(self, prompt: str) -> list[int]:
        """The CLIP segment's ids (each segment has its own: ``segments``)."""
        return self.clip_ids(prompt)

    def text_towers(self) -> list[tuple[Any, nn.Module]]:
        return list(zip(self.tokenizers, self.encoders, strict=True))

    def context_and_pooled(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        kw = dict(padding="max_length", truncation=True, return_tensors="pt")
        with torch.set_grad_enabled(self.grad):  # no-grad batches but for the audit's attacks
            states, pooled = [], []
            for tok, model in zip(self.tokenizers[:2], self.encoders[:2], strict=True):
                ids = tok(list(prompts), max_length=self.segments[0].length, **kw).input_ids
                out = model(ids.to(self.device), output_hidden_states=True)
                states.append(out.hidden_states[-2].float().cpu())
                pooled.append(out[0].float().cpu())  # CLIPTextModelWithProjection: text_embeds
            clip = torch.cat(states, dim=-1)
            clip = torch.nn.functional.pad(clip, (0, self.joint - clip.shape[-1]))
            t5_ids = self.tokenizers[2](list(prompts), max_length=self.max_length, **kw).input_ids
            t5 = self.encoders[2](t5_ids.to(self.device))[0].float().cpu()
        return torch.cat([clip, t5], dim=1), torch.cat(pooled, dim=-1)

    def unet_forward(self, unet: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> Any:
        """The transformer on (b, c, h, w) latents at timesteps ``t`` (1000 x noise level)."""
        return unet(
            hidden_states=x,
            timestep=t.to(x.dtype).expand(x.shape[0]),
            encoder_hidden_states=cond["context"],
            pooled_projections=cond["pooled"],
        )


def build_tiny_pipeline(seed: int = 0, text_width: int = 32):  # -> StableDiffusion3Pipeline
    """A seeded random SD-3.x-shaped pipeline (tiny widths, offline): two joint blocks (the
    last context-pre-only), CLIP-L / CLIP-G of ``text_width`` with projections, a T5 as wide
    as both (the corpus-made tokenizer, 24 positions), a 32 px VAE with a shift factor, SD 3's
    FlowMatchEuler (shift 3)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    t5_tok = t5_tokenizer(TINY_SEQUENCE_LENGTH)
    with seeded(seed):
        transformer = SD3Transformer2DModel(
            sample_size=16,
            patch_size=2,
            in_channels=4,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=2 * text_width,
            caption_projection_dim=32,
            pooled_projection_dim=2 * text_width,
            out_channels=4,
            pos_embed_max_size=16,
        )
        vae = tiny_vae((16, 32), sample_size=32, shift_factor=0.0609, scaling_factor=1.5305)
        clip = tiny_clip_text(text_width, projection_dim=text_width)
        clip_l = CLIPTextModelWithProjection(CLIPTextConfig(**clip))
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig(**clip))
        t5 = tiny_t5(t5_tok, 2 * text_width)
    return assemble(
        StableDiffusion3Pipeline,
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=clip_l,
        tokenizer=clip_tokenizer(),
        text_encoder_2=clip_g,
        tokenizer_2=clip_tokenizer(pad_token=PAD_TOKEN_2),
        text_encoder_3=t5,
        tokenizer_3=t5_tok,
    )


class SD3(MMDiTFamily):
    name: ClassVar[str] = "sd3"
    pipeline_class: ClassVar[str] = "StableDiffusion3Pipeline"
    description: ClassVar[str] = "sd3: a StableDiffusion3Pipeline (CLIP-L, CLIP-G and T5, MMDiT transformer)"
    pad_token: ClassVar[str] = CLIP_DEFAULT_PAD  # the first segment's; CLIP-G pads with '!', T5 with <pad>
    time_scale: ClassVar[float] = 1000.0
    text_side: ClassVar[TextSide] = (
        ("CLIPTokenizer", "CLIPTextModelWithProjection"),
        ("CLIPTokenizer", "CLIPTextModelWithProjection"),
        ("T5TokenizerFast", "T5EncoderModel"),
    )

    build_tiny_pipeline = staticmethod(build_tiny_pipeline)

    def prompt_encoder(
        self, components: tuple[Any, ...], device: torch.device, batch_size: int = 64
    ) -> SD3TextEncoder:
        return SD3TextEncoder(components[:3], components[3:], device, batch_size)

    def pipeline_kwargs(
        self, pipe: Any, noise: torch.Tensor, steps: int, guidance: float
    ) -> tuple[int, dict[str, Any]]:
        length = t5_length(pipe.tokenizer_3, T5_SEQUENCE_LENGTH)
        return steps, {"latents": noise, "guidance_scale": guidance, "max_sequence_length": length}


FAMILY = SD3()
