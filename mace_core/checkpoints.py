"""The erased model on disk: compact erasure file and diffusers folder (save/load symmetric).

The compact file holds only the replaced attn2 to_k / to_v matrices, keyed by their
state-dict names, with metadata naming the base model; ``apply_erasure`` puts them into
a pipeline of that base model and reproduces the erased weights exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from mace_core.errors import ArtefactError
from mace_core.models import set_attn2_weights

FORMAT = "mace-erasure/1"


def erasure_bytes(weights: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    meta = {"format": FORMAT, **{k: str(v) for k, v in metadata.items()}}
    return st_save({k: v.contiguous().float() for k, v in sorted(weights.items())}, metadata=meta)


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file held in memory."""
    # safetensors layout: 8-byte little-endian header length, then the JSON header.
    header_len = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + header_len]).get("__metadata__", {}) or {}


def read_erasure(data: bytes, what: str = "erasure file") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        tensors = st_load(data)
        meta = safetensors_metadata(data)
    except Exception as e:
        raise ArtefactError(f"{what} is not a readable safetensors file: {e}") from None
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
