"""Concept masks for the attention loss. Grounded-SAM comes with its own module; here:
whole-image masks and masks given by the user."""

from __future__ import annotations

import numpy as np


def whole_image_masks(n: int, height: int, width: int) -> np.ndarray:
    """(n, H, W) all-true masks: styles, and the fallback when nothing is detected."""
    return np.ones((n, height, width), dtype=bool)
