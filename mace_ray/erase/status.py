"""``mace-ray status``: a run's status and progress, read from its manifest (nothing is written).

A manifest left "running" by a driver that is gone (killed, OOM, its node lost: it could not
say so) reads as "interrupted" once the run's lease is not live, as the rerun treats it.
"""

from __future__ import annotations

from typing import Any

from mace_core.erasure_report import headline, summary_line
from mace_core.errors import MaceError
from mace_ray.erase import artefacts
from mace_ray.erase.layout import RunLayout
from mace_ray.erase.locate import locate_run
from mace_ray.storage.base import Storage, read_json
from mace_ray.storage.lease import lease_is_live


def run_status(output: str | None, run: str, s3_endpoint: str | None = None) -> dict[str, Any]:
    """A run's manifest status and progress, read from storage. ``run``: a run id under
    ``output`` (default mace-runs), or the path or s3:// URL of the run's folder
    (``mace_ray.erase.locate``)."""
    ref = locate_run(run, output, s3_endpoint)
    storage, layout, run = ref.storage, ref.layout, ref.run_id
    if not storage.exists(layout.manifest):
        raise MaceError(f"run {run!r}: no manifest under {storage.url}/{layout.root}")
    manifest = read_json(storage, layout.manifest)
    missing = [
        k for k in ("status", "model", "concepts") if not isinstance(manifest, dict) or k not in manifest
    ]
    if missing:
        where = f"{storage.url}/{layout.manifest}"
        raise MaceError(f"run {run!r}: {where} is not a mace-ray manifest (no {', '.join(missing)})")
    if not isinstance(manifest["concepts"], list):  # valid JSON of another shape (hand-edited)
        where = f"{storage.url}/{layout.manifest}"
        raise MaceError(f"run {run!r}: {where} is not a mace-ray manifest (its concepts are not a list)")
    done = artefacts.done_slugs(storage, layout)
    status = manifest["status"]
    if status == "running" and not _lease_held(storage, layout):
        # Its driver is gone (killed, its node lost) without marking it: the rerun resumes it.
        status = "interrupted"
        manifest.setdefault("error", "its driver stopped without a word (no live lease)")
    out = {
        "run_id": run,
        "location": ref.where,
        "status": status,
        "model": manifest["model"],
        "concepts": len(manifest["concepts"]),
        "concepts_done": len(done),
        "resumed": manifest.get("resumed", 0),
        "created": manifest.get("created"),
    }
    if "error" in manifest:
        out["error"] = manifest["error"]
    if manifest["status"] == "complete":
        report = read_json(storage, layout.report)
        if not isinstance(report, dict) or not isinstance(report.get("erasure") or {}, dict):
            # Valid JSON, but not what a run writes: the run's folder was edited, not a bug.
            raise MaceError(f"run {run!r}: {storage.url}/{layout.report} is not a mace-ray report")
        out["seconds"] = report.get("seconds")
        if report.get("erasure"):
            out["erasure"] = headline(report["erasure"])
            out["erasure_summary"] = summary_line(report["erasure"])
    return out


def _lease_held(storage: Storage, layout: RunLayout) -> bool:
    """Whether some driver holds the run's lease now (``mace_ray.storage.lease``)."""
    try:
        return storage.exists(layout.lock) and lease_is_live(storage.read_bytes(layout.lock))
    except MaceError:  # released while we looked
        return False
