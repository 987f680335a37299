"""Concept masks for the attention loss. Grounded-SAM comes with its own module; here:
whole-image masks and masks given by the user."""

from __future__ import annotations

import numpy as np

from mace_core.errors import ArtefactError


def whole_image_masks(n: int, height: int, width: int) -> np.ndarray:
    """(n, H, W) all-true masks: styles, and the fallback when nothing is detected."""
    return np.ones((n, height, width), dtype=bool)


def check_masks(masks: np.ndarray, images: np.ndarray, what: str) -> np.ndarray:
    """Given masks must be one boolean (H, W) per image, at the image size."""
    if masks.shape != images.shape[:3]:
        raise ArtefactError(f"{what}: masks of shape {masks.shape} do not match images {images.shape[:3]}")
    return masks.astype(bool)
