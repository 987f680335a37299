"""FLUX.1 (schnell, dev): a FluxPipeline, T5 context, CLIP pooled embedding, MMDiT transformer.

The transformer's text enters through ``context_embedder`` (T5-XXL's last hidden states,
4096 -> 3072) and the pooled CLIP-L embedding through the time-text embedding; both are
edited (``mmdit.py``). The context is one T5 segment: no start token, </s> at the end,
padded with <pad> (id 0) to the sequence length, which is the T5 tokenizer's
``model_max_length`` capped at FLUX's 512 (both released models ship 512; BFL's reference
code conditions schnell on 256: a folder whose tokenizer_2 says 256 gets 256).

Generation: FLUX.1-dev is guidance-distilled: its guidance embedding takes the scale
(distilled from CFG at the same scale), one forward per step, no negative prompt.
FLUX.1-schnell has no guidance embedding and is timestep-distilled for a few steps: it
samples with at most ``SCHNELL_STEPS``. Both keep their FlowMatchEuler scheduler.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from mace_core.clip_text import clip_tokenizer, tiny_clip_text
from mace_core.families.base import Conditioning, TextSide
from mace_core.families.mmdit import MMDiTEncoder, MMDiTFamily, Segment, t5_length, tokenizer_ids
from mace_core.families.tiny import assemble, seeded, tiny_vae
from mace_core.t5_text import T5_PAD, t5_tokenizer, tiny_t5

MAX_SEQUENCE_LENGTH = 512  # FluxPipeline's limit


SCHNELL_STEPS = 4  # FLUX.1-schnell's distilled step count
TRAIN_GUIDANCE = 3.5  # FLUX.1-dev's default guidance, for its training forward passes
# The tiny pipeline's T5 positions: as many as CLIP's, so that a prompt has as many rows in
# the closed forms as on the tiny SD 1.x and the per-token weights balance as they do there
# (with 32, the same erase leaves residual 0.41 instead of 0.32: README, FLUX.1 and SD 3.x).
TINY_SEQUENCE_LENGTH = 77


def pack(x: torch.Tensor) -> torch.Tensor:
    """(b, c, h, w) latents -> (b, h/2 * w/2, 4c) 2x2 patches, as FluxPipeline packs them."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, _, c4 = x.shape
    x = x.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, h, w)


def image_ids(h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """RoPE positions of the (h/2 x w/2) patches: (0, row, column)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device, dtype)


class FluxTextEncoder(MMDiTEncoder):
    """CLIP (pooled) and T5 (context) of a FluxPipeline, used in no-grad batches."""

    def __init__(self, clip_tok, t5_tok, clip, t5, device: torch.device, batch_size: int = 64) -> None:
        self.clip_tok, self.t5_tok, self.clip, self.t5 = clip_tok, t5_tok, clip, t5
        self.device = device
        self.batch_size = batch_size
        self.max_length = t5_length(t5_tok, MAX_SEQUENCE_LENGTH)
        t5_ids = tokenizer_ids(t5_tok)
        self.segments = [Segment("T5", 0, self.max_length, t5_ids, start_token=False)]
        clip_limit = Segment("CLIP", 0, int(clip_tok.model_max_length), tokenizer_ids(clip_tok), True)
        self.limits = [*self.segments, clip_limit]
        self.joint = int(t5.config.d_model)
        self.pooled_width = int(clip.config.hidden_size)

    def ids(self, prompt: str) -> list[int]:
        return self.segments[0].ids(prompt)

    def content_ids(self, text: str) -> list[int]:
        return self.segments[0].content(text)

    def text_towers(self) -> list[tuple[Any, nn.Module]]:
        return [(self.clip_tok, self.clip), (self.t5_tok, self.t5)]

    def context_and_pooled(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        kw = dict(padding="max_length", truncation=True, return_tensors="pt")
        t5 = self.t5_tok(list(prompts), max_length=self.max_length, **kw).input_ids
        clip = self.clip_tok(list(prompts), max_length=int(self.clip_tok.model_max_length), **kw).input_ids
        with torch.set_grad_enabled(self.grad):  # no-grad batches but for the audit's attacks
            context = self.t5(t5.to(self.device))[0]
            pooled = self.clip(clip.to(self.device)).pooler_output
        return context.float().cpu(), pooled.float().cpu()

    def unet_forward(self, unet: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> Any:
        """The transformer on (b, c, h, w) latents at noise levels ``t``; its output unpacked."""
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        b, _, h, w = x.shape
        guidance = torch.full((b,), TRAIN_GUIDANCE, device=x.device) if unet.config.guidance_embeds else None
        out = unet(
            hidden_states=pack(x),
            timestep=t.to(x.dtype).expand(b),
            guidance=guidance,
            pooled_projections=cond["pooled"],
            encoder_hidden_states=cond["context"],
            txt_ids=torch.zeros(cond["context"].shape[1], 3, device=x.device, dtype=x.dtype),
            img_ids=image_ids(h, w, x.device, x.dtype),
            return_dict=False,
        )[0]
        return Transformer2DModelOutput(sample=unpack(out, h, w))


def build_tiny_pipeline(seed: int = 0, text_width: int = 32):  # -> FluxPipeline
    """A seeded random FLUX.1-dev-shaped pipeline (tiny widths, offline): two double-stream
    and one single-stream block, a guidance embedding, CLIP-L and T5 text encoders of
    ``text_width`` (the corpus-made T5 tokenizer, 77 positions), a 32 px VAE with a shift
    factor, FLUX's dynamically shifted FlowMatchEuler scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    t5_tok = t5_tokenizer(TINY_SEQUENCE_LENGTH)
    with seeded(seed):
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,  # 4 latent channels in 2x2 patches
            num_layers=2,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=text_width,
            pooled_projection_dim=text_width,
            guidance_embeds=True,
            axes_dims_rope=(4, 6, 6),
        )
        vae = tiny_vae((16, 32), sample_size=32, shift_factor=0.1159, scaling_factor=0.3611)
        clip = CLIPTextModel(CLIPTextConfig(**tiny_clip_text(text_width)))
        t5 = tiny_t5(t5_tok, text_width)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15
    )
    return assemble(
        FluxPipeline,
        scheduler=scheduler,
        vae=vae,
        text_encoder=clip,
        tokenizer=clip_tokenizer(),
        text_encoder_2=t5,
        tokenizer_2=t5_tok,
        transformer=transformer,
    )


class Flux(MMDiTFamily):
    name: ClassVar[str] = "flux"
    pipeline_class: ClassVar[str] = "FluxPipeline"
    description: ClassVar[str] = "flux: a FluxPipeline (CLIP pooled + T5 context, MMDiT transformer)"
    pad_token: ClassVar[str] = T5_PAD  # the context's (T5's); CLIP only gives the pooled embedding
    text_side: ClassVar[TextSide] = (
        ("CLIPTokenizer", "CLIPTextModel"),
        ("T5TokenizerFast", "T5EncoderModel"),
    )

    build_tiny_pipeline = staticmethod(build_tiny_pipeline)

    def prompt_encoder(
        self, components: tuple[Any, ...], device: torch.device, batch_size: int = 64
    ) -> FluxTextEncoder:
        tok, tok2, te, te2 = components
        return FluxTextEncoder(tok, tok2, te, te2, device, batch_size)

    def latent_shape(self, pipe: Any, height: int, width: int) -> tuple[int, int, int]:
        # FluxPipeline's latents are whole 2x2 patches: sizes rounded down to 2 * vae scale.
        scale = 2 * int(pipe.vae_scale_factor)
        c = int(pipe.transformer.config.in_channels) // 4
        return (c, 2 * (height // scale), 2 * (width // scale))

    def pipeline_kwargs(
        self, pipe: Any, noise: torch.Tensor, steps: int, guidance: float
    ) -> tuple[int, dict[str, Any]]:
        dev = bool(pipe.transformer.config.guidance_embeds)
        length = t5_length(pipe.tokenizer_2, MAX_SEQUENCE_LENGTH)
        kwargs = {"latents": pack(noise), "guidance_scale": guidance, "max_sequence_length": length}
        return (steps if dev else min(steps, SCHNELL_STEPS)), kwargs


FAMILY = Flux()
