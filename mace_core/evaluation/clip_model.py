"""CLIP image and text embeddings for the evaluation metrics (transformers ``CLIPModel``).

``load_clip`` takes a hub id (e.g. ``openai/clip-vit-large-patch14``), a local folder with
the model, tokenizer and image processor files, or ``tiny``: a seeded random CLIP with tiny
text and vision towers and the real CLIP tokenizer, built offline for tests and the tiny
demo (its scores are meaningless, its code path is the real one).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mace_core.clip_text import TINY_CLIP_TEXT, TINY_TOWER, clip_tokenizer
from mace_core.evaluation.settings import TINY_CLIP
from mace_core.pretrained import load_pretrained


@dataclass
class ClipModel:
    model: object  # transformers.CLIPModel
    tokenizer: object  # CLIPTokenizer
    processor: object  # CLIPImageProcessor
    device: torch.device
    name: str

    @torch.no_grad()
    def image_embeddings(self, images: list[np.ndarray], batch_size: int = 32) -> torch.Tensor:
        """Projected image embeddings (N, d), float32 on the CPU, not normalised."""
        out = []
        for i in range(0, len(images), batch_size):
            # Writable copies: PNG-decoded arrays are read-only and torch warns about them.
            batch = [np.array(im) for im in images[i : i + batch_size]]
            px = self.processor(images=batch, return_tensors="pt")["pixel_values"]
            feats = self.model.get_image_features(pixel_values=px.to(self.device, self.model.dtype))
            out.append(_pooled(feats).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.dim)

    @torch.no_grad()
    def text_embeddings(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """Projected text embeddings (N, d), float32 on the CPU, not normalised.

        Texts longer than CLIP's 77 tokens are truncated, as every CLIP-score implementation does.
        """
        out = []
        for i in range(0, len(texts), batch_size):
            tok = self.tokenizer(
                list(texts[i : i + batch_size]),
                padding=True,
                truncation=True,
                max_length=77,
                return_tensors="pt",
            )
            feats = self.model.get_text_features(
                input_ids=tok["input_ids"].to(self.device),
                attention_mask=tok["attention_mask"].to(self.device),
            )
            out.append(_pooled(feats).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.dim)

    @property
    def dim(self) -> int:
        return int(self.model.config.projection_dim)


def _pooled(feats) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected embedding;
    # transformers 4 returned the tensor itself.
    return feats if isinstance(feats, torch.Tensor) else feats.pooler_output


def build_tiny_clip(seed: int = 0, device: torch.device | None = None) -> ClipModel:
    """A seeded random CLIP (32 px images, 32-wide towers) with the real CLIP tokenizer."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    text = dict(TINY_CLIP_TEXT)
    vision = dict(TINY_TOWER, image_size=32, patch_size=8)
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG alone
        torch.manual_seed(seed)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    device = device or torch.device("cpu")
    return ClipModel(model.eval().to(device), clip_tokenizer(), processor, device, TINY_CLIP)


def load_clip(spec: str, device: torch.device) -> ClipModel:
    """``tiny``, a hub id or a local folder; failures are a ModelLoadError naming ``spec``."""
    if spec == TINY_CLIP:
        return build_tiny_clip(device=device)
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    def load(source: str, local_only: bool) -> ClipModel:
        model = CLIPModel.from_pretrained(source, local_files_only=local_only, use_safetensors=True)
        tokenizer = CLIPTokenizer.from_pretrained(source, local_files_only=local_only)
        processor = CLIPImageProcessor.from_pretrained(source, local_files_only=local_only)
        return ClipModel(model.eval().to(device), tokenizer, processor, device, spec)

    return load_pretrained(load, spec, "CLIP model")
