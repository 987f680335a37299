"""Where a run is, named the one way every command takes one, and where the masker's models are.

A RUN is either a run id (the folder name under ``ROOT/runs/``, as ``mace-ray erase`` prints
it) with ``--output ROOT`` (default ``mace-runs``), or the path or ``s3://`` URL of the
run's folder, ``ROOT/runs/<run_id>``: then ROOT is the run's output, derived from the folder,
and an ``--output`` naming another root is refused. Anything with a ``/`` is a folder. The
same holds where a command takes a run root (``--output`` of status, gc, pull): a run's
folder given there stands for its ROOT. Commands that take a model or an erasure file (eval,
audit, apply) also take a run's folder, or its ``final/pipeline`` / ``final/erasure.safetensors``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from mace_core.errors import MaceError
from mace_core.masking import check_masker, check_masker_sources, masker_specs
from mace_core.settings import MaskSettings
from mace_ray.engine.requests import DEFAULT_OUTPUT
from mace_ray.erase.layout import RunLayout
from mace_ray.storage.base import Storage
from mace_ray.storage.model_cache import is_remote, split_run
from mace_ray.storage.resolve import Sources, canonical


@dataclass(frozen=True)
class RunRef:
    """A run: the storage of its root (the --output it was written to) and its id."""

    storage: Storage
    run_id: str

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.run_id)

    @property
    def where(self) -> str:
        return f"{self.storage.url}/{self.layout.root}"


def run_root(root: str) -> str:
    """A run root as given, or the ROOT of a run's folder given in its place."""
    parts = split_run(root)
    if parts is not None and not parts[2]:
        return parts[0] or "."
    return root


def locate_run(
    run: str,
    output: str | None = None,
    s3_endpoint: str | None = None,
    sources: Sources | None = None,
    flag: str = "RUN",
) -> RunRef:
    """The run ``run`` names (see the module), its root opened read-only (the command's
    output when it is the same location). MaceError naming ``run`` when it names none:
    the caller checks that the run is there (messages differ by command)."""
    sources = sources or Sources(s3_endpoint)
    if not run.strip():  # else a storage key "runs//manifest.json" names the fault, not RUN
        raise MaceError(
            f"{flag} {run!r} is empty; give a run id (as `mace-ray erase` prints it) or a run's folder"
        )
    if "/" not in run:
        root, run_id = run_root(output or DEFAULT_OUTPUT), run
    else:
        parts = split_run(run)
        if parts is None or parts[2]:
            raise MaceError(
                f"{flag} {run!r}: not a run id (as `mace-ray erase` prints it) nor a run's folder "
                "(ROOT/runs/<run_id>, 16 hex digits)"
            )
        root, run_id = parts[0] or ".", parts[1]
        if output is not None and canonical(run_root(output)) != canonical(root):
            raise MaceError(
                f"{flag} {run!r} is a run under {root!r}, not under --output {output!r}: drop --output "
                "(a run's folder names its root)"
            )
    return RunRef(sources.open_root(root), run_id)


def check_masker_inputs(masks: MaskSettings, tiny: bool, sources: Sources) -> None:
    """The detector and segmenter the workers will load, checked before anything is written:
    an s3:// one where it is (its listing: nothing is fetched on the driver), the others by
    ``mace_core.masking.check_masker_sources`` (local folders, hub ids)."""
    checked: set[str] = set()
    name = check_masker(masks.masker)
    if name != "whole-image":
        detector, segmenter = masker_specs(masks, tiny)
        if is_remote(detector):
            sources.check_folder(detector, "detector")
            checked.add(detector)
        if segmenter is not None and is_remote(segmenter):
            if name == "segment-anything":
                sources.check_file(segmenter, "SAM checkpoint")
            else:
                sources.check_folder(segmenter, "segmenter")
            checked.add(segmenter)
    check_masker_sources(masks, tiny, checked)


def local_masks(masks: MaskSettings, s3_endpoint: str | None, sources: Sources | None = None) -> MaskSettings:
    """``masks`` with an s3:// detector or segmenter replaced by its cached local copy
    (fetched where this runs: on the worker that loads the masker)."""
    if not any(s is not None and is_remote(s) for s in (masks.detector, masks.segmenter)):
        return masks
    sources = sources or Sources(s3_endpoint)
    changes: dict[str, str] = {}
    if masks.detector is not None and is_remote(masks.detector):
        changes["detector"] = sources.folder(masks.detector, "detector")
    if masks.segmenter is not None and is_remote(masks.segmenter):
        sam_file = masks.masker == "segment-anything"
        fetch = sources.file if sam_file else sources.folder
        changes["segmenter"] = fetch(masks.segmenter, "SAM checkpoint" if sam_file else "segmenter")
    return dataclasses.replace(masks, **changes)
