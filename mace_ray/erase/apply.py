"""``mace-ray apply``: a compact erasure file and its base model make an erased pipeline folder.

The folder is the base model's own (a local folder, a hub id's snapshot, an ``s3://``
model's cached copy, or the built-in ``tiny`` saved once) with the erasure's tensors
replaced in the edited component's weights, as a run writes ``final/pipeline``
(``mace_core.erased_folder``): nothing is loaded and saved again.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path

from mace_core.checkpoints import read_erasure
from mace_core.erased_folder import ErasedFolder, write_erased_folder
from mace_core.errors import ArtefactError, MaceError
from mace_core.families import family_for
from mace_core.source_folder import source_folder
from mace_ray.storage.model_cache import fingerprint_model, resolve_model

log = logging.getLogger("mace_ray")


def apply_erasure_file(
    erasure: Path,
    output: Path,
    model: str | None = None,
    other_model: bool = False,
    s3_endpoint: str | None = None,
) -> ErasedFolder:
    """Write the erased pipeline of ``erasure`` to ``output`` (a new or empty folder).

    ``model``: the base model (default: the one named in the file). A model whose
    fingerprint is not the one the erasure was computed on is refused unless
    ``other_model``. Errors are MaceErrors naming the input.
    """
    if not erasure.is_file():
        raise MaceError(f"erasure file {str(erasure)!r} does not exist")
    if output.exists() and not output.is_dir():
        raise MaceError(f"--output {str(output)!r} is a file; give a folder for the pipeline")
    if output.is_dir() and any(output.iterdir()):
        # Files of whatever was there (another model's weights, a stale variant) would stay
        # beside the erased model and could be loaded instead of it.
        raise MaceError(f"--output {str(output)!r} is not empty; give a new or empty folder")
    data = erasure.read_bytes()
    tensors, meta = read_erasure(data, str(erasure))
    base = model or meta.get("base_model")
    if not base:
        raise ArtefactError(f"{str(erasure)!r} names no base model; pass --model")
    expected = meta.get("model_fingerprint")
    if expected and not other_model:
        # The erasure replaces matrices computed from one model's weights: on any other
        # weights it would mix two models without a word.
        now = fingerprint_model(base, s3_endpoint).full
        if now != expected:
            raise MaceError(
                f"{str(erasure)!r} was computed on a model with fingerprint {expected}; "
                f"{base!r} has {now} (pass --other-model to apply it anyway)"
            )
    local = resolve_model(base, s3_endpoint)  # an s3:// model: its cached local copy
    component = family_for(local).edited_component
    if meta.get("component", component) != component:
        raise ArtefactError(
            f"{str(erasure)!r} edits the {meta['component']} of its model; {base!r} has its edited"
            f" projections in {component}"
        )
    output.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the output and renamed into place: a folder that exists is complete.
    staging = output.parent / f".{output.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with tempfile.TemporaryDirectory(prefix="mace-apply-") as scratch:
            source = source_folder(local, Path(scratch))
            written = write_erased_folder(source, staging, component, tensors, str(erasure))
        if output.is_dir():
            output.rmdir()  # empty, checked above
        os.replace(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for note in written.notes():
        log.warning("apply: %s", note)
    return written
