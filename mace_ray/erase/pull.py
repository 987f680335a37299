"""``mace-ray pull RUN DIR``: a complete run's final outputs, copied into a local folder.

DIR gets the part of the run's folder that people use, in the run's own layout::

    DIR/final/pipeline/             the erased diffusers pipeline
    DIR/final/erasure.safetensors   the compact erasure file (``mace-ray apply``)
    DIR/final/cfr.safetensors       the CFR-refined matrices the LoRAs apply to (a MACE run)
    DIR/concepts/<slug>/            lora.safetensors, notes.json
    DIR/report.json, DIR/manifest.json

Every file but the manifest itself is checked against the SHA-256 the run recorded in its
manifest (``outputs``) before it is put in place; one that is already there and matches is
not fetched again, so an interrupted pull resumes. The manifest is written last: a DIR that
has it is complete, and is itself a run's folder for ``mace-ray eval``, ``audit`` and
``apply``. A run that is not complete is refused in one line.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any

from mace_core.errors import ArtefactError, MaceError
from mace_core.fingerprint import file_digest, file_sha256
from mace_ray.erase.locate import locate_run
from mace_ray.storage.base import StorageError, check_key

log = logging.getLogger("mace_ray")

PIPELINE = "final/pipeline"


def _verified(path: Path, sha256: str) -> bool:
    """Whether ``path`` is a file with this content (its digest cached by stat: a rerun
    over a pulled 5 GB pipeline only stats it)."""
    return path.is_file() and file_digest(path) == sha256


def _files(manifest: dict[str, Any], root: str, where: str) -> dict[str, str]:
    """{path under the run's folder: SHA-256} of the outputs the run recorded."""
    sums = manifest.get("outputs")
    if not isinstance(sums, dict) or not sums:
        raise MaceError(f"run {where} records no checksums of its outputs (an older mace-ray wrote it)")
    out = {}
    for key, sha in sums.items():
        if str(key).startswith(root + "/"):
            rel = str(key)[len(root) + 1 :]
            try:
                check_key(rel)  # a manifest names files under DIR, never outside it
            except StorageError:
                raise ArtefactError(f"{where}/manifest.json names an unsafe output path {rel!r}") from None
            out[rel] = str(sha)
    return out


def pull_run(run: str, dest: str | Path, output: str | None = None, s3_endpoint: str | None = None) -> dict:
    """Copy run ``run``'s final outputs into ``dest`` (see the module); returns what was done."""
    if not str(dest).strip():  # Path("") is the working folder: an unset "$DIR" must not fill it
        raise MaceError("DIR '' is empty; give a folder")
    ref = locate_run(run, output, s3_endpoint)
    storage, layout, where = ref.storage, ref.layout, ref.where
    if not storage.exists(layout.manifest):
        raise MaceError(f"RUN {run!r}: no run at {where} (no manifest.json)")
    raw = storage.read_bytes(layout.manifest)
    try:
        manifest = json.loads(raw)
    except ValueError:
        manifest = None
    if not isinstance(manifest, dict):
        raise ArtefactError(f"{where}/manifest.json is not a mace-ray manifest")
    status = manifest.get("status")
    if status != "complete":
        raise MaceError(
            f"run {ref.run_id} at {where} is {status}, not complete: pull copies a complete run's outputs "
            "(finish it with its erase command; `mace-ray status` shows where it is)"
        )
    files = _files(manifest, layout.root, where)
    # The report is checked by its checksum like every output; a run of an older mace-ray
    # recorded none for it: its report is copied as it is, if it is JSON.
    report = None if "report.json" in files else storage.read_bytes(layout.report)
    if report is not None:
        try:
            json.loads(report)
        except ValueError:
            raise ArtefactError(f"{where}/report.json is not valid JSON") from None

    folder = Path(dest).expanduser()
    if folder.exists() and not folder.is_dir():
        raise MaceError(f"DIR {str(dest)!r} is a file; give a folder")
    run_folder = Path(storage.url, layout.root).resolve()
    if "://" not in storage.url and folder.resolve().is_relative_to(run_folder):
        # Its copies would nest inside what they copy (and a rerun check them as the run's).
        raise MaceError(f"DIR {str(dest)!r} is inside the run's own folder {str(run_folder)!r}; give another")
    held = folder / "manifest.json"
    if held.is_file():
        try:
            other = json.loads(held.read_bytes()).get("run_id")
        except (ValueError, AttributeError):
            other = None
        if other != ref.run_id:
            raise MaceError(f"DIR {str(dest)!r} holds another run ({other}); give a new or empty folder")
        held.unlink()  # the folder is complete again only once this pull has verified it
    todo = {rel: sha for rel, sha in files.items() if not _verified(folder / rel, sha)}
    parts = {rel: folder / rel for rel in todo}
    staged = {rel: p.with_name(f".{p.name}.{uuid.uuid4().hex[:8]}.part") for rel, p in parts.items()}
    try:
        storage.get_files({f"{layout.root}/{rel}": staged[rel] for rel in todo})
        for rel, sha in todo.items():
            if file_sha256(staged[rel]) != sha:
                raise ArtefactError(
                    f"{where}/{rel} does not match the SHA-256 its run recorded (damaged or replaced)"
                )
            os.replace(staged[rel], parts[rel])
    finally:
        for p in staged.values():
            p.unlink(missing_ok=True)
    # Files the run's pipeline does not have (a stale variant) could be loaded instead of it.
    pipeline = folder / PIPELINE
    extra = [p for p in pipeline.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() not in files]
    for p in extra:
        log.warning("pull: removing %s, which the run's pipeline does not have", p)
        p.unlink()
    if report is not None:
        (folder / "report.json").write_bytes(report)
    held.write_bytes(raw)  # last: a folder with its manifest is complete
    fetched = sum(parts[rel].stat().st_size for rel in todo)
    log.info("pull: %d files of run %s, %d fetched (%d bytes), %d already there", len(files), ref.run_id,
             len(todo), fetched, len(files) - len(todo))  # fmt: skip
    return {
        "run_id": ref.run_id,
        "from": where,
        "to": str(folder.resolve()),
        "files": len(files) + (1 if report is None else 2),  # with the manifest (and an old report)
        "fetched": len(todo),
        "fetched_bytes": fetched,
        "reused": len(files) - len(todo),
    }
