"""``mace-ray apply``: a compact erasure file and its base model make an erased pipeline folder.

The folder is the base model's own (a local folder, a hub id's snapshot, an ``s3://``
model's cached copy, or the built-in ``tiny`` saved once) with the erasure's tensors
replaced in the edited component's weights, as a run writes ``final/pipeline``
(``mace_core.erased_folder``): nothing is loaded and saved again. The erasure file and the
output may be local or ``s3://`` (``mace_ray.storage.resolve``).
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
from mace_ray.storage.model_cache import is_remote, split_run
from mace_ray.storage.resolve import Sources, join

log = logging.getLogger("mace_ray")

ERASURE_IN_RUN = ("final", "erasure.safetensors")


def erasure_spec(erasure: str) -> str:
    """The erasure file ``erasure`` names: itself, or a run's folder's (local or s3://,
    ``ROOT/runs/<run_id>`` or a folder ``mace-ray pull`` wrote) ``final/erasure.safetensors``."""
    parts = split_run(erasure)
    if (parts is not None and not parts[2]) or (
        not is_remote(erasure) and Path(erasure).expanduser().is_dir()
    ):
        return join(erasure, *ERASURE_IN_RUN)
    return erasure


def apply_erasure_file(
    erasure: str | Path,
    output: str | Path,
    model: str | None = None,
    other_model: bool = False,
    s3_endpoint: str | None = None,
) -> ErasedFolder:
    """Write the erased pipeline of ``erasure`` to ``output`` (a new or empty folder, or a new
    s3:// location, where the folder is uploaded once complete).

    ``erasure``: a local path or an s3:// URL (fetched into the model cache, checked against
    the SHA-256 its run recorded), or a run's folder (its final/erasure.safetensors).
    ``model``: the base model (default: the one named in the file). A model whose
    fingerprint is not the one the erasure was computed on is refused unless
    ``other_model``. Errors are MaceErrors naming the input.
    """
    sources = Sources(s3_endpoint)
    spec = erasure_spec(str(erasure))
    out = str(output)
    if not out.strip():  # Path("") is the working folder: an unset "$OUT" must not fill it
        raise MaceError("--output '' is empty; give a new folder for the pipeline")
    if is_remote(spec):
        local_erasure = Path(sources.file(spec, "erasure file"))
    elif not Path(spec).expanduser().is_file():
        if spec != str(erasure) and (Path(erasure).expanduser() / "manifest.json").is_file():
            # A run's folder without its erasure file: the run has not finished.
            raise MaceError(
                f"run folder {str(erasure)!r} has no {'/'.join(ERASURE_IN_RUN)}: the run is not complete "
                "(`mace-ray status` shows where it is)"
            )
        raise MaceError(f"erasure file {spec!r} does not exist")
    else:
        local_erasure = Path(spec).expanduser()
    if is_remote(out):
        if sources.exists(out):
            raise MaceError(f"--output {out!r} exists; give a new location for the pipeline")
    else:
        folder = Path(out).expanduser()
        if folder.exists() and not folder.is_dir():
            raise MaceError(f"--output {out!r} is a file; give a folder for the pipeline")
        if folder.is_dir() and any(folder.iterdir()):
            # Files of whatever was there (another model's weights, a stale variant) would stay
            # beside the erased model and could be loaded instead of it.
            raise MaceError(f"--output {out!r} is not empty; give a new or empty folder")
    tensors, meta = read_erasure(local_erasure.read_bytes(), spec)
    base = model or meta.get("base_model")
    if not base:
        raise ArtefactError(f"{spec!r} names no base model; pass --model")
    expected = meta.get("model_fingerprint")
    if expected and not other_model:
        # The erasure replaces matrices computed from one model's weights: on any other
        # weights it would mix two models without a word.
        now = sources.fingerprint(base).full
        if now != expected:
            raise MaceError(
                f"{spec!r} was computed on a model with fingerprint {expected}; "
                f"{base!r} has {now} (pass --other-model to apply it anyway)"
            )
    local = sources.pipeline(base)  # an s3:// model: its cached local copy
    component = family_for(local).edited_component
    if meta.get("component", component) != component:
        raise ArtefactError(
            f"{spec!r} edits the {meta['component']} of its model; {base!r} has its edited"
            f" projections in {component}"
        )
    if is_remote(out):
        with tempfile.TemporaryDirectory(prefix="mace-apply-") as scratch:
            staging = Path(scratch) / "pipeline"
            written = write_erased_folder(
                source_folder(local, Path(scratch) / "src"), staging, component, tensors, spec
            )
            storage, key = sources.remote(out)
            storage.put_dir(staging, key)  # visible once complete (its commit marker)
    else:
        written = _write_local(local, folder, component, tensors, spec)
    for note in written.notes():
        log.warning("apply: %s", note)
    return written


def _write_local(local: str, output: Path, component: str, tensors: dict, what: str) -> ErasedFolder:
    output.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the output and renamed into place: a folder that exists is complete.
    staging = output.parent / f".{output.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with tempfile.TemporaryDirectory(prefix="mace-apply-") as scratch:
            source = source_folder(local, Path(scratch))
            written = write_erased_folder(source, staging, component, tensors, what)
        if output.is_dir():
            output.rmdir()  # empty, checked above
        os.replace(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return written
