"""Box-prompted SAM masks: the segmentation half of Grounded-SAM (MACE Stage 2).

Two interchangeable segmenters with one method, ``segment(images, boxes)``, returning
one boolean mask per box at the image size (single-mask output, as Grounded-SAM uses):

- ``TransformersSam``: transformers ``SamModel`` + ``SamProcessor`` (hub id, local folder,
  or ``tiny``), the default.
- ``SegmentAnythingSam``: Meta's ``segment_anything`` package with an original ``.pth``
  checkpoint; the model type (vit_b / vit_l / vit_h, or the built-in ``tiny``
  architecture) is read from the state dict's shapes, else from the file name.

Both run the heavy image encoder once for all images of a call and the light mask
decoder per image, in chunks of boxes so that the full-resolution masks of a pathological
number of boxes (thresholds near 0) cannot exhaust memory.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import partial
from pathlib import Path

import numpy as np
import torch

from mace_core.errors import ModelLoadError
from mace_core.grounding import image_batch
from mace_core.pretrained import TINY, load_model_and_processor

DEFAULT_SEGMENTER = "facebook/sam-vit-huge"
# Boxes decoded at once: each costs a float mask at the image size before thresholding.
BOX_CHUNK = 16


def _chunks(x: torch.Tensor, size: int) -> tuple[torch.Tensor, ...]:
    return torch.split(x, size, dim=0)


class TransformersSam:
    """SAM through transformers; images of a call share one image-encoder batch."""

    def __init__(self, model, processor, device: torch.device) -> None:  # SamModel, SamProcessor
        self.model = model.to(device).eval()
        self.processor = processor
        self.device = device

    @torch.no_grad()
    def segment(self, images: np.ndarray, boxes: list[np.ndarray]) -> list[np.ndarray]:
        """uint8 (N, H, W, 3) images and per image (k, 4) xyxy boxes -> per image bool (k, H, W)."""
        inputs = self.processor(images=image_batch(images), return_tensors="pt")
        embeddings = self.model.get_image_embeddings(inputs["pixel_values"].to(self.device))
        original = inputs["original_sizes"].tolist()
        reshaped = inputs["reshaped_input_sizes"].tolist()
        out = []
        for i, b in enumerate(boxes):
            (oh, ow), (rh, rw) = original[i], reshaped[i]
            # Boxes in the resized (longest side = encoder size) frame, as SamProcessor scales them.
            scale = torch.tensor([rw / ow, rh / oh, rw / ow, rh / oh])
            scaled = torch.as_tensor(b, dtype=torch.float32).reshape(-1, 4) * scale
            masks = []
            for chunk in _chunks(scaled, BOX_CHUNK):
                pred = self.model(
                    image_embeddings=embeddings[i : i + 1],
                    input_boxes=chunk[None].to(self.device),
                    multimask_output=False,
                ).pred_masks  # (1, k, 1, h, w) logits
                full = self.processor.post_process_masks(pred.float(), [(oh, ow)], [(rh, rw)])[0]
                masks.append(full[:, 0].cpu())
            out.append(torch.cat(masks).numpy() if masks else np.zeros((0, oh, ow), dtype=bool))
        return out


class SegmentAnythingSam:
    """SAM through ``segment_anything``: SamPredictor's transform and prompts, batched images.

    ``SamPredictor`` embeds one image at a time; this runs the same steps (ResizeLongestSide,
    ``Sam.preprocess``, image encoder, prompt encoder, mask decoder, ``postprocess_masks``)
    with the image encoder over all images of a call.
    """

    def __init__(self, sam, device: torch.device) -> None:  # segment_anything.modeling.Sam
        from segment_anything.utils.transforms import ResizeLongestSide

        self.sam = sam.to(device).eval()
        self.device = device
        self.transform = ResizeLongestSide(sam.image_encoder.img_size)

    @torch.no_grad()
    def segment(self, images: np.ndarray, boxes: list[np.ndarray]) -> list[np.ndarray]:
        """uint8 (N, H, W, 3) images and per image (k, 4) xyxy boxes -> per image bool (k, H, W)."""
        sam = self.sam
        h, w = images.shape[1:3]
        x = np.stack([self.transform.apply_image(im) for im in images])
        x = torch.as_tensor(x, device=self.device).permute(0, 3, 1, 2).float()
        input_size = tuple(x.shape[-2:])
        embeddings = sam.image_encoder(sam.preprocess(x))
        dense_pe = sam.prompt_encoder.get_dense_pe()
        out = []
        for i, b in enumerate(boxes):
            tb = torch.as_tensor(b, dtype=torch.float32, device=self.device).reshape(-1, 4)
            tb = self.transform.apply_boxes_torch(tb, (h, w))
            masks = []
            for chunk in _chunks(tb, BOX_CHUNK):
                sparse, dense = sam.prompt_encoder(points=None, boxes=chunk, masks=None)
                low_res, _ = sam.mask_decoder(
                    image_embeddings=embeddings[i : i + 1],
                    image_pe=dense_pe,
                    sparse_prompt_embeddings=sparse,
                    dense_prompt_embeddings=dense,
                    multimask_output=False,
                )
                full = sam.postprocess_masks(low_res.float(), input_size, (h, w))
                masks.append((full[:, 0] > sam.mask_threshold).cpu())
            out.append(torch.cat(masks).numpy() if masks else np.zeros((0, h, w), dtype=bool))
        return out


# ---------------------------------------------------------------- transformers SAM


def build_tiny_transformers_sam(seed: int = 0):  # -> (SamModel, SamProcessor)
    """A seeded random transformers SAM with a 64 px, 2-layer ViT; built offline in milliseconds."""
    from transformers import (
        SamConfig,
        SamImageProcessor,
        SamMaskDecoderConfig,
        SamModel,
        SamProcessor,
        SamPromptEncoderConfig,
        SamVisionConfig,
    )

    hidden = 32
    config = SamConfig(
        vision_config=SamVisionConfig(
            hidden_size=hidden,
            output_channels=hidden,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=64,
            patch_size=8,
            window_size=4,
            global_attn_indexes=[1],
            mlp_dim=64,
            # The shared positional embedding feeds the prompt encoder: half its width.
            num_pos_feats=hidden // 2,
        ),
        prompt_encoder_config=SamPromptEncoderConfig(
            hidden_size=hidden, image_size=64, patch_size=8, mask_input_channels=4
        ),
        mask_decoder_config=SamMaskDecoderConfig(
            hidden_size=hidden,
            mlp_dim=64,
            num_attention_heads=2,
            iou_head_depth=2,
            iou_head_hidden_dim=hidden,
        ),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SamModel(config).eval()
    image_processor = SamImageProcessor(
        size={"longest_edge": 64},
        pad_size={"height": 64, "width": 64},
        mask_size={"longest_edge": 16},
        mask_pad_size={"height": 16, "width": 16},
    )
    return model, SamProcessor(image_processor=image_processor)


def load_transformers_sam(spec: str, device: torch.device) -> TransformersSam:
    """``tiny``, a hub id or a local folder of a transformers SAM; errors name ``spec``."""
    if spec == TINY:
        return TransformersSam(*build_tiny_transformers_sam(), device)
    if spec.endswith((".pth", ".pt")):
        raise ModelLoadError(
            f"segmenter {spec!r} is an original SAM checkpoint: use the segment-anything masker for it"
        )

    from transformers import SamModel, SamProcessor

    model, processor = load_model_and_processor(spec, "segmenter", "sam", "SAM", SamModel, SamProcessor)
    return TransformersSam(model, processor, device)


# ---------------------------------------------------------------- segment_anything SAM

# The built-in tiny architecture (tests, demos): 64 px input, 8 px patches, width 32.
TINY_SAM = {"img_size": 64, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "prompt_dim": 32}
# Width of the image encoder's patch embedding -> model type.
SAM_WIDTHS: dict[int, str] = {768: "vit_b", 1024: "vit_l", 1280: "vit_h", TINY_SAM["embed_dim"]: TINY}
PATCH_KEY = "image_encoder.patch_embed.proj.weight"


def build_segment_anything(model_type: str):  # -> segment_anything.modeling.Sam
    """An untrained ``Sam`` of a registry type (vit_b, vit_l, vit_h) or of the tiny architecture."""
    from segment_anything import sam_model_registry
    from segment_anything.modeling import (
        ImageEncoderViT,
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

    if model_type != TINY:
        return sam_model_registry[model_type](checkpoint=None).eval()
    t = TINY_SAM
    dim, grid = t["prompt_dim"], t["img_size"] // t["patch_size"]
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=t["img_size"],
            patch_size=t["patch_size"],
            embed_dim=t["embed_dim"],
            depth=t["depth"],
            num_heads=t["num_heads"],
            mlp_ratio=2.0,
            out_chans=dim,
            qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            window_size=4,
            global_attn_indexes=(1,),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=dim,
            image_embedding_size=(grid, grid),
            input_image_size=(t["img_size"], t["img_size"]),
            mask_in_chans=4,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=64, num_heads=2),
            transformer_dim=dim,
            iou_head_depth=2,
            iou_head_hidden_dim=dim,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    ).eval()


def build_tiny_segment_anything(seed: int = 0):  # -> segment_anything.modeling.Sam
    """The tiny architecture with seeded random weights, identical on every machine."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_segment_anything(TINY)


def sam_model_type(state: Mapping[str, torch.Tensor], path: str) -> str:
    """vit_b / vit_l / vit_h / tiny from the patch-embedding width, else from the file name."""
    weight = state.get(PATCH_KEY)
    if isinstance(weight, torch.Tensor) and weight.ndim == 4:
        width = int(weight.shape[0])
        if width not in SAM_WIDTHS:
            known = ", ".join(f"{k} ({v})" for k, v in SAM_WIDTHS.items())
            raise ModelLoadError(f"SAM checkpoint {path!r}: image encoder width {width} is none of {known}")
        return SAM_WIDTHS[width]
    m = re.search(r"vit_([bhl])", Path(path).name.lower())
    if m:
        return f"vit_{m.group(1)}"
    raise ModelLoadError(f"SAM checkpoint {path!r}: no {PATCH_KEY} and no vit_b/vit_l/vit_h in the file name")


def load_segment_anything_checkpoint(path: str):  # -> segment_anything.modeling.Sam
    """An original SAM ``.pth`` (a plain state dict), read with ``torch.load(weights_only=True)``."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ModelLoadError(
            f"SAM checkpoint {path!r}: no such file (segment-anything needs an original SAM .pth file)"
        )
    try:
        # weights_only: tensors and containers only, never arbitrary pickled objects.
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(
            f"SAM checkpoint {path!r} cannot be read (corrupt or not a PyTorch checkpoint): {first[:300]}"
        ) from None
    if not isinstance(state, Mapping):
        raise ModelLoadError(f"SAM checkpoint {path!r}: expected a state dict, got {type(state).__name__}")
    model_type = sam_model_type(state, path)
    sam = build_segment_anything(model_type)
    try:
        sam.load_state_dict(state, strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:300]
        raise ModelLoadError(f"SAM checkpoint {path!r} does not fit SAM {model_type}: {detail}") from None
    return sam.eval()


def load_segment_anything(spec: str, device: torch.device) -> SegmentAnythingSam:
    """``tiny`` (random weights) or the path of an original SAM ``.pth`` checkpoint."""
    if spec == TINY:
        return SegmentAnythingSam(build_tiny_segment_anything(), device)
    return SegmentAnythingSam(load_segment_anything_checkpoint(spec), device)
