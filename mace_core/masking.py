"""Concept masks for the attention loss (MACE Stage 2, Eq. 3): Grounded-SAM.

Grounding DINO finds boxes for the concept text (box threshold 0.3, text threshold 0.25),
SAM turns every box into a mask, and the masks of an image are OR-ed. An image without a
box gets a whole-image mask; such fallbacks are counted so the run report can show them.

One interface for every backend::

    masker = load_masker(settings.masks, device, tiny=model == "tiny")  # once per worker
    result = masker(images, concept.text)  # uint8 (N, H, W, 3) -> MaskResult

Backends (``MaskSettings.masker``): ``grounded-sam`` (transformers Grounding DINO + SAM),
``segment-anything`` (transformers Grounding DINO boxes, masks from an original SAM
``.pth`` through the ``segment_anything`` package) and ``whole-image``. Models load once in
``load_masker``; on CUDA they run under bf16 autocast, on CPU in fp32.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from mace_core.errors import MaceError
from mace_core.grounding import DEFAULT_DETECTOR, GroundingDino, load_grounding_dino
from mace_core.masks import whole_image_masks
from mace_core.pretrained import TINY, looks_like_path, resolve_pretrained
from mace_core.segmentation import DEFAULT_SEGMENTER, load_segment_anything, load_transformers_sam
from mace_core.settings import MASKERS, MaskSettings


class MaskerError(MaceError):
    """A masker name or masker input is not usable."""


@dataclass(frozen=True)
class MaskResult:
    """Masks of one call, with what the run report needs to count per concept."""

    masks: np.ndarray  # bool (N, H, W), at the image size
    fallbacks: int  # images where no box was found: whole-image masks
    boxes: list[int]  # boxes found per image (0 for a fallback)
    empty: int = 0  # images with boxes whose SAM masks are all empty


class Masker(Protocol):
    name: str

    def __call__(self, images: np.ndarray, text: str) -> MaskResult: ...


class BoxSegmenter(Protocol):
    def segment(self, images: np.ndarray, boxes: list[np.ndarray]) -> list[np.ndarray]: ...


def union_masks(masks: np.ndarray) -> np.ndarray:
    """OR of the per-box masks of one image: bool (k, H, W) -> (H, W); k = 0 gives all-false."""
    if masks.ndim != 3:
        raise ValueError(f"expected per-box masks of shape (k, H, W), got {masks.shape}")
    return np.logical_or.reduce(masks.astype(bool), axis=0) if len(masks) else np.zeros(masks.shape[1:], bool)


def check_images(images: np.ndarray) -> None:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        got = images.dtype if isinstance(images, np.ndarray) else type(images).__name__
        raise MaskerError(f"images must be a uint8 numpy array (N, H, W, 3), got {got}")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise MaskerError(f"images must have shape (N, H, W, 3), got {images.shape}")


class WholeImageMasker:
    """Every pixel is the concept: styles, and runs without a detector."""

    name = "whole-image"

    def __call__(self, images: np.ndarray, text: str) -> MaskResult:
        check_images(images)
        n, h, w = images.shape[:3]
        return MaskResult(whole_image_masks(n, h, w), fallbacks=0, boxes=[0] * n)


@dataclass(eq=False)
class GroundedSam:
    """Grounding DINO boxes, SAM masks per box, OR per image; no box -> whole-image mask."""

    name: str
    detector: GroundingDino = field(repr=False)
    segmenter: BoxSegmenter = field(repr=False)
    device: torch.device
    autocast_dtype: torch.dtype | None = None

    def precision(self) -> AbstractContextManager:
        """Autocast to ``autocast_dtype`` (bf16 on CUDA via load_masker); None: run as loaded."""
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def __call__(self, images: np.ndarray, text: str) -> MaskResult:
        check_images(images)
        n, h, w = images.shape[:3]
        masks = whole_image_masks(n, h, w)
        with self.precision():
            boxes = self.detector.detect(images, text)
            found = [i for i, b in enumerate(boxes) if len(b)]
            per_box = self.segmenter.segment(images[found], [boxes[i] for i in found]) if found else []
        empty = 0
        for i, m in zip(found, per_box, strict=True):
            masks[i] = union_masks(m)
            empty += int(not masks[i].any())
        return MaskResult(masks, fallbacks=n - len(found), boxes=[len(b) for b in boxes], empty=empty)


def default_autocast(device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA (SAM-H's encoder is ~4x faster than fp32); fp32 elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else None


def check_masker(name: str) -> str:
    """The masker name, or an error listing the valid ones (the same list MaskSettings checks)."""
    if name not in MASKERS:
        raise MaskerError(f"unknown masker {name!r} (valid: {', '.join(MASKERS)})")
    return name


def masker_specs(settings: MaskSettings, tiny: bool = False) -> tuple[str, str | None]:
    """(detector, segmenter) a grounded masker loads: the settings', else the defaults for the
    model (the built-in tiny ones for the tiny model, the hub's otherwise; segment-anything
    has no default segmenter)."""
    detector = settings.detector or (TINY if tiny else DEFAULT_DETECTOR)
    if settings.masker == "segment-anything":
        return detector, settings.segmenter or (TINY if tiny else None)
    return detector, settings.segmenter or (TINY if tiny else DEFAULT_SEGMENTER)


def check_masker_sources(settings: MaskSettings, tiny: bool = False, checked: Collection[str] = ()) -> None:
    """Fail fast, without loading a model, on a detector or segmenter the workers could not load.

    The driver calls this before a run writes anything: a local path must be a model folder
    (or, for segment-anything, a SAM .pth file); a hub id must be in the local Hugging Face
    cache or, unless HF_HUB_OFFLINE is set, on the hub (one request each). The defaults of a
    model that is not ``tiny`` are hub ids, checked the same way: an offline machine learns
    at once that it needs --detector/--segmenter (or --masker whole-image). ``checked``:
    specs the caller has checked where they are (remote ones, fetched later by the workers).
    """
    name = check_masker(settings.masker)
    if name == "whole-image":
        return
    detector, seg = masker_specs(settings, tiny)
    if detector != TINY and detector not in checked:
        _check_source(detector, "detector", "--detector")
    if name == "segment-anything":
        if seg is None:
            raise MaskerError(
                "the segment-anything masker needs --segmenter = the path of an original SAM .pth"
            )
        if seg != TINY and seg not in checked and not Path(seg).expanduser().is_file():
            raise MaskerError(f"SAM checkpoint {seg!r}: no such file")
    elif seg is not None and seg != TINY and seg not in checked:
        _check_source(seg, "segmenter", "--segmenter")


def _check_source(spec: str, what: str, flag: str) -> None:
    """A local folder that is a transformers model, or a hub id that can be fetched."""
    if looks_like_path(spec):
        resolve_pretrained(spec, what)
        return
    problem = hub_problem(spec)
    if problem is not None:
        raise MaskerError(
            f"{what} hub id {spec!r} {problem}; pass {flag} a local model folder (or 'tiny' for a "
            "test), or --masker whole-image"
        )


def hub_problem(repo_id: str) -> str | None:
    """Why a transformers model on the hub cannot be loaded from here, or None when it can:
    its config is in the local cache, or (online) the hub has it."""
    from huggingface_hub import HfApi, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        return None
    # Read at call time (huggingface_hub reads HF_HUB_OFFLINE once, when imported).
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return "is not in the local Hugging Face cache and HF_HUB_OFFLINE is set"
    try:
        found = HfApi().file_exists(repo_id, "config.json")
    except Exception as e:  # no network, DNS, auth, gated: many kinds; one request, no retries
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        return f"is not in the local Hugging Face cache and the hub cannot be reached ({first})"
    return None if found else "is not a model on the Hugging Face hub (no config.json)"


def load_masker(settings: MaskSettings, device: torch.device, tiny: bool = False) -> Masker:
    """Build the masker once (per worker); it is then called for every concept.

    ``tiny``: the diffusion model is the built-in tiny one, so an unset detector and
    segmenter default to the built-in tiny random models instead of the hub defaults
    (``IDEA-Research/grounding-dino-tiny``, ``facebook/sam-vit-huge``). The
    segment-anything backend needs ``segmenter`` = the path of an original SAM ``.pth``.
    """
    name = check_masker(settings.masker)
    if name == "whole-image":
        return WholeImageMasker()
    detector_spec, segmenter_spec = masker_specs(settings, tiny)
    if segmenter_spec is None:
        raise MaskerError(
            "the segment-anything masker needs segmenter = the path of an original SAM .pth checkpoint"
        )
    segmenter: BoxSegmenter = (
        load_transformers_sam(segmenter_spec, device)
        if name == "grounded-sam"
        else load_segment_anything(segmenter_spec, device)
    )
    detector = load_grounding_dino(detector_spec, device, settings.box_threshold, settings.text_threshold)
    return GroundedSam(name, detector, segmenter, device, default_autocast(device))
