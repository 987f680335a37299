"""Lossless PNG encoding of images and masks (bytes in, bytes out; storage is elsewhere)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from mace_core.errors import ArtefactError


def png_bytes(array: np.ndarray) -> bytes:
    """uint8 (H, W, 3) image or bool (H, W) mask -> PNG (masks as 1-bit)."""
    img = Image.fromarray(array) if array.dtype != bool else Image.fromarray(array).convert("1")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def read_png(data: bytes, what: str, mask: bool = False) -> np.ndarray:
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as e:
        raise ArtefactError(f"{what} is not a readable PNG: {e}") from None
    if mask:
        return np.asarray(img.convert("L")) > 127
    return np.asarray(img.convert("RGB"), dtype=np.uint8)
