"""The compact erasure file: only the replaced matrices, keyed by their state-dict names
inside the edited component (``component`` in its metadata: the family's
``edited_component``), with metadata naming the base model.

``apply_erasure`` puts them into a loaded pipeline of that base model and reproduces the
erased weights exactly. The erased diffusers folder is not a loaded pipeline saved again:
it is the source folder with those tensors replaced (``mace_core.erased_folder``).
"""

from __future__ import annotations

import torch

from mace_core.errors import ArtefactError
from mace_core.models import pipeline_projections
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
    """Put the erased matrices (the family's edited projections) into ``pipe`` (in place);
    returns the file's metadata."""
    tensors, meta = read_erasure(data, what)
    projections = pipeline_projections(pipe)
    projections.set_weights(projections.from_component_tensors(tensors))
    return meta
