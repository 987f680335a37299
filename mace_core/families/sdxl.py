"""Stable Diffusion XL: two CLIP text encoders, pooled text embeddings and size conditioning.

The UNet's cross-attention context is the penultimate hidden states (``hidden_states[-2]``)
of both text encoders (CLIPTextModel, CLIPTextModelWithProjection) concatenated along the
feature axis (768 + 1280 = 2048 in the real model), so every attn2 to_k / to_v takes that
width and CFR / fusion work on it unchanged. The UNet is also conditioned
(``added_cond_kwargs``) on the second encoder's pooled, projected embedding
(``text_embeds``) and on ``time_ids`` = (original size, crop (0, 0), target size).

The first tokenizer pads with end-of-text, the second with '!' (id 0); apart from
padding both give the same ids for a prompt, except that the second keeps its pad '!'
whole (id 0): the lengths must agree (checked in ``ids``) so positions align, and
``ids`` comes from the first. Alignment and the Eq. 3 mask go by position, not pad id.

fp16: StableDiffusionXLPipeline itself decodes in fp32 when its VAE config says
``force_upcast`` (the SDXL VAE overflows in fp16), so generation needs nothing more.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from mace_core.clip_text import TINY_CLIP_TEXT, clip_tokenizer, tiny_clip_text
from mace_core.errors import ConceptError, quoted
from mace_core.families.base import Conditioning, ModelFamily, PromptEncoder, TextSide
from mace_core.families.model_index import TINY_MODEL, ModelIndex
from mace_core.families.stable_diffusion import CLIP_DEFAULT_PAD
from mace_core.families.tiny import SD_NOISE_SCHEDULE, assemble, seeded, tiny_unet, tiny_vae

PAD_TOKEN_2 = "!"  # the second (OpenCLIP bigG) tokenizer pads with token 0, '!' in CLIP's vocabulary

TINY_SDXL_TEXT_2 = tiny_clip_text(32, projection_dim=32)
TINY_TIME_EMBED = 8
DEFAULT_SIZE = 1024  # SDXL base's native size


def split_width(width: int) -> tuple[int, int]:
    """Two text encoders' widths that sum to a context ``width``, split as SDXL splits its
    2048 (768 + 1280), the first a multiple of 16: 64 -> 32 + 32, 96 -> 32 + 64, 128 -> 48 + 80."""
    first = max(16, 16 * round(width * 768 / 2048 / 16))
    if width - first < 16:
        raise ValueError(f"context width {width} is too narrow for two text encoders")
    return first, width - first


def two_clip_ids(tokenizers: Sequence[Any], prompt: str, which: str) -> list[int]:
    """The first of two CLIP tokenizers' ids of ``prompt`` (SDXL's, SD 3.x's), checked against the
    second's: a ConceptError naming ``which`` tokenizers where the lengths differ."""
    first = list(tokenizers[0](prompt, truncation=False).input_ids)
    second = list(tokenizers[1](prompt, truncation=False).input_ids)
    # The second tokenizer's '!' is its pad token, kept whole: "!" is id 0 there and
    # "!!" two tokens, one in the first. Positions align only if the lengths agree.
    if len(first) != len(second):
        raise ConceptError(
            f"prompt {quoted(prompt)}: {which} split it into {len(first)} and"
            f" {len(second)} tokens (repeated '!'?), so their states do not line up"
        )
    return first


class SDXLTextEncoder(PromptEncoder):
    """Both tokenizers and text encoders of SDXL, used in no-grad batches."""

    def __init__(
        self, tokenizers, text_encoders, device: torch.device, batch_size: int = 64, size: int = 1024
    ) -> None:
        self.tokenizers = tokenizers
        self.models = text_encoders
        self.device = device
        self.batch_size = batch_size
        self.max_length = int(tokenizers[0].model_max_length)
        self.size = size  # original and target size of the time ids (the family's default resolution)

    @property
    def dim(self) -> int:
        return sum(int(m.config.hidden_size) for m in self.models)

    def ids(self, prompt: str) -> list[int]:
        return two_clip_ids(self.tokenizers, prompt, "SDXL's two tokenizers")

    def text_towers(self) -> list[tuple[Any, Any]]:
        return list(zip(self.tokenizers, self.models, strict=True))

    def _encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.set_grad_enabled(self.grad):  # no-grad batches but for the audit's attacks
            return self._states(prompts)

    def _states(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        states, pooled = [], []
        for i in range(0, len(prompts), self.batch_size):
            batch = list(prompts[i : i + self.batch_size])
            parts = []
            for tokenizer, model in zip(self.tokenizers, self.models, strict=True):
                tok = tokenizer(
                    batch,
                    padding="max_length",
                    max_length=self.max_length,
                    truncation=True,
                    return_tensors="pt",
                )
                out = model(tok.input_ids.to(self.device), output_hidden_states=True)
                parts.append(out.hidden_states[-2].float().cpu())
            states.append(torch.cat(parts, dim=-1))
            pooled.append(out[0].float().cpu())  # CLIPTextModelWithProjection: text_embeds
        return torch.cat(states), torch.cat(pooled)

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        return self._encode(prompts)[0]

    def conditioning(self, prompts: Sequence[str]) -> Conditioning:
        context, pooled = self._encode(prompts)
        s = float(self.size)
        time_ids = torch.tensor([s, s, 0.0, 0.0, s, s]).expand(len(prompts), 6).clone()
        return {"context": context, "text_embeds": pooled, "time_ids": time_ids}

    def unet_forward(self, unet: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> Any:
        return unet(
            x,
            t,
            encoder_hidden_states=cond["context"],
            added_cond_kwargs={"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]},
        )


def build_tiny_pipeline(seed: int = 0, widths: tuple[int, int] | None = None):  # -> StableDiffusionXLPipeline
    """A seeded random SDXL-shaped pipeline (tiny widths, offline), identical on every machine.

    Adapted from the dummy components of diffusers' SDXL tests (Apache-2.0): text_time
    added conditioning, linear-projection transformers (two in the second block), cross
    attention as wide as both text encoders together, an Euler scheduler. ``widths``: the
    two text encoders' widths (default 32 and 32, the ``tiny`` model's), the second also
    its projection's; the cross-attention context is their sum.
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    text_1, text_2 = TINY_CLIP_TEXT, TINY_SDXL_TEXT_2
    if widths is not None:
        w1, w2 = widths
        text_1, text_2 = tiny_clip_text(w1), tiny_clip_text(w2, projection_dim=w2)
    with seeded(seed):
        unet = tiny_unet(
            cross_attention_dim=text_1["hidden_size"] + text_2["hidden_size"],
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=TINY_TIME_EMBED,
            transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=text_2["projection_dim"] + 6 * TINY_TIME_EMBED,
        )
        vae = tiny_vae((16, 32), sample_size=64, force_upcast=True)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_1))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_2))
    scheduler = EulerDiscreteScheduler(**SD_NOISE_SCHEDULE, timestep_spacing="leading")
    return assemble(
        StableDiffusionXLPipeline,
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(pad_token=PAD_TOKEN_2),
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )


class SDXL(ModelFamily):
    name: ClassVar[str] = "sdxl"
    pipeline_class: ClassVar[str] = "StableDiffusionXLPipeline"
    description: ClassVar[str] = "sdxl: a StableDiffusionXLPipeline (two CLIP text encoders)"
    pad_token: ClassVar[str] = CLIP_DEFAULT_PAD  # the first tokenizer's; the second pads with '!'
    load_kwargs: ClassVar[dict[str, Any]] = {"add_watermarker": False}
    text_side: ClassVar[TextSide] = (
        ("CLIPTokenizer", "CLIPTextModel"),
        ("CLIPTokenizer", "CLIPTextModelWithProjection"),
    )

    build_tiny_pipeline = staticmethod(build_tiny_pipeline)

    def load_text_components(self, model: str) -> tuple[Any, ...]:
        """(tokenizer, tokenizer_2, text_encoder, text_encoder_2, default size): a folder's size
        from its configs (``native_size``), the tiny pipeline's from itself."""
        parts = super().load_text_components(model)
        return parts if model == TINY_MODEL else (*parts, native_size(ModelIndex.read(model)))

    def text_components(self, pipe: Any) -> tuple[Any, ...]:
        size = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
        return (*super().text_components(pipe), size)

    def prompt_encoder(
        self, components: tuple[Any, ...], device: torch.device, batch_size: int = 64
    ) -> SDXLTextEncoder:
        tok, tok2, te, te2, size = components
        return SDXLTextEncoder((tok, tok2), (te, te2), device, batch_size, size)


def native_size(index: ModelIndex) -> int:
    """The model's default image size from its unet/ and vae/ configs (SDXL's 1024 where a
    text-only copy has neither): the original and target size of the time ids."""
    unet, vae = index.json("unet/config.json"), index.json("vae/config.json")
    if not unet or not vae or "sample_size" not in unet:
        return DEFAULT_SIZE
    return int(unet["sample_size"]) * 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)


FAMILY = SDXL()
