"""What SD 1.x and SD 2.x share: a StableDiffusionPipeline, one CLIP tokenizer and text encoder.

The two differ in their text encoder (CLIP ViT-L, OpenCLIP ViT-H with a GELU), their
tokenizer's padding (``<|endoftext|>`` vs ``!``), their UNet's transformers and, for the
768 px SD 2.x models, their prediction type (v_prediction): all read from the model's
own configs, so one loader and one PromptEncoder serve both (``sd1.py``, ``sd2.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from mace_core.families.base import ModelFamily, PromptEncoder, TextSide
from mace_core.families.model_index import ModelIndex
from mace_core.families.tiny import assemble

CLIP_DEFAULT_PAD = "<|endoftext|>"  # what CLIPTokenizer pads with when its config names nothing


class TextEncoder(PromptEncoder):
    """CLIP tokenizer + text encoder, used in no-grad batches: the final token states are
    the UNet's cross-attention context."""

    def __init__(self, tokenizer, text_encoder, device: torch.device, batch_size: int = 64) -> None:
        self.tokenizer = tokenizer
        self.model = text_encoder
        self.device = device
        self.batch_size = batch_size
        self.max_length = int(tokenizer.model_max_length)

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def ids(self, prompt: str) -> list[int]:
        """Unpadded token ids with start/end tokens."""
        return list(self.tokenizer(prompt, truncation=False).input_ids)

    def text_towers(self) -> list[tuple[Any, Any]]:
        return [(self.tokenizer, self.model)]

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """Final token states, (len(prompts), max_length, d), float32 on the CPU."""
        out = []
        for i in range(0, len(prompts), self.batch_size):
            tok = self.tokenizer(
                list(prompts[i : i + self.batch_size]),
                padding="max_length",
                max_length=self.max_length,
                truncation=True,
                return_tensors="pt",
            )
            with torch.set_grad_enabled(self.grad):  # no-grad batches but for the audit's attacks
                h = self.model(tok.input_ids.to(self.device))[0]
            out.append(h.float().cpu())
        return torch.cat(out)


def assemble_pipeline(vae: Any, text_encoder: Any, tokenizer: Any, unet: Any, scheduler: Any) -> Any:
    """A StableDiffusionPipeline of built (random) components, in eval mode, without a safety
    checker and without progress bars: the tiny models of the families and benchmarks."""
    from diffusers import StableDiffusionPipeline

    return assemble(
        StableDiffusionPipeline,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tokenizer_pad_token(index: ModelIndex) -> str:
    """The pad token a pipeline folder's ``tokenizer/`` declares (CLIPTokenizer's default if none)."""
    for name in ("tokenizer/tokenizer_config.json", "tokenizer/special_tokens_map.json"):
        pad = (index.json(name) or {}).get("pad_token")
        if isinstance(pad, dict):  # older files store an AddedToken
            pad = pad.get("content")
        if isinstance(pad, str):
            return pad
    return CLIP_DEFAULT_PAD


class StableDiffusionFamily(ModelFamily):
    """A StableDiffusionPipeline whose tokenizer pads with ``pad_token``."""

    pipeline_class: ClassVar[str] = "StableDiffusionPipeline"
    load_kwargs: ClassVar[dict[str, Any]] = {"safety_checker": None, "requires_safety_checker": False}
    text_side: ClassVar[TextSide] = (("CLIPTokenizer", "CLIPTextModel"),)

    def recognises(self, index: ModelIndex) -> bool:
        return super().recognises(index) and tokenizer_pad_token(index) == self.pad_token

    def recognises_pipeline(self, pipe: Any) -> bool:
        return super().recognises_pipeline(pipe) and pipe.tokenizer.pad_token == self.pad_token

    def prompt_encoder(
        self, components: tuple[Any, ...], device: torch.device, batch_size: int = 64
    ) -> TextEncoder:
        tokenizer, text_encoder = components
        return TextEncoder(tokenizer, text_encoder, device, batch_size)
