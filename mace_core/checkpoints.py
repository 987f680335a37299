"""The erased model on disk: compact erasure file and diffusers folder (save/load symmetric).

The compact file holds only the replaced attn2 to_k / to_v matrices, keyed by their
state-dict names, with metadata naming the base model; ``apply_erasure`` puts them into
a pipeline of that base model and reproduces the erased weights exactly.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mace_core.attn2 import set_attn2_weights
from mace_core.errors import ArtefactError
from mace_core.sealed import open_sealed, sealed_bytes

FORMAT = "mace-erasure/1"


def erasure_bytes(weights: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    meta = {"format": FORMAT, **{k: str(v) for k, v in metadata.items()}}
    return sealed_bytes({k: v.contiguous().float() for k, v in sorted(weights.items())}, meta)


def read_erasure(data: bytes, what: str = "erasure file") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    # Files of earlier versions carry no checksum; they are still read.
    tensors, meta = open_sealed(data, what, required=False)
    if meta.get("format") != FORMAT:
        raise ArtefactError(f"{what} is not a mace-ray erasure file (format {meta.get('format')!r})")
    return tensors, meta


def apply_erasure(pipe, data: bytes, what: str = "erasure file") -> dict[str, str]:
    """Put the erased attn2 matrices into ``pipe`` (in place); returns the file's metadata."""
    tensors, meta = read_erasure(data, what)
    set_attn2_weights(pipe.unet, tensors)
    return meta


def save_pipeline(pipe, folder: str | Path) -> None:
    """A diffusers folder that ``StableDiffusionPipeline.from_pretrained`` loads."""
    pipe.save_pretrained(str(folder), safe_serialization=True)
