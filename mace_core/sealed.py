"""Sealed safetensors: files that carry the checksum of their own tensor bytes.

Every tensor artefact of a run (statistics, the CFR matrix, LoRAs, the erasure file) is
sealed, so whoever reuses one can tell a whole file from a truncated or altered one
without any other record, and recompute it instead of trusting it.
"""

from __future__ import annotations

import hashlib
import json

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from mace_core.errors import ArtefactError

# The metadata key of a sealed file: SHA-256 of its tensor bytes (everything after the header).
SEAL = "payload_sha256"


def _split(data: bytes) -> tuple[int, bytes]:
    # safetensors layout: 8-byte little-endian header length, the JSON header, then the tensors.
    header_len = int.from_bytes(data[:8], "little")
    return header_len, data[8 + header_len :]


def sealed_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """A safetensors file whose metadata carries the SHA-256 of its tensor bytes, so a reader
    can tell a whole file from a truncated or altered one without any other record.

    Offsets in the header are relative to the tensor bytes, so adding the seal to the header
    leaves those bytes (and their digest) unchanged.
    """
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    _, payload = _split(st_save(tensors, metadata=meta or None))
    return st_save(tensors, metadata={**meta, SEAL: hashlib.sha256(payload).hexdigest()})


def open_sealed(
    data: bytes, what: str, required: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a sealed file; ArtefactError when it is unreadable, unsealed
    (if ``required``) or its tensor bytes do not match the seal."""
    try:
        meta = safetensors_metadata(data)
        tensors = st_load(data)
    except Exception as e:
        raise ArtefactError(f"{what} is not a readable safetensors file: {str(e)[:200]}") from None
    seal = meta.get(SEAL)
    if seal is None:
        if required:
            raise ArtefactError(f"{what} carries no checksum (written by an older version)")
        return tensors, meta
    if hashlib.sha256(_split(data)[1]).hexdigest() != seal:
        raise ArtefactError(f"{what} does not match its checksum (altered or truncated)")
    return tensors, meta


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file held in memory."""
    # safetensors layout: 8-byte little-endian header length, then the JSON header.
    header_len = int.from_bytes(data[:8], "little")
    if len(data) < 8 + header_len:
        raise ValueError(f"header of {header_len} bytes, file of {len(data)}")
    return json.loads(data[8 : 8 + header_len]).get("__metadata__", {}) or {}
