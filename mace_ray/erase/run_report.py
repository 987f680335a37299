"""What an erase run reports when it ends: report.json's contents (``run_report``) and the
closing progress line (``closing_summary``)."""

from __future__ import annotations

from typing import Any

from mace_ray.engine.provenance import versions
from mace_ray.erase.run import EraseRun


def run_report(run: EraseRun, notes: dict[str, dict]) -> dict[str, Any]:
    p, storage, layout, erasure = run.p, run.storage, run.layout, run.erasure
    concepts = []
    for c in run.concepts:
        n = notes[c.slug]
        losses = n.get("losses") or [None]
        extra = {k: v for k, v in n.items() if k not in ("losses", "concept")}
        concepts.append(
            {
                **c.to_dict(),
                "slug": c.slug,
                "loss_first": losses[0],
                "loss_last": losses[-1],
                **extra,
                "erasure": erasure["concepts"].get(c.slug),
            }
        )
    return {
        "run_id": p.run_id,
        "status": "complete",
        "output": {
            # Full locations (folder or s3:// URL), all alike.
            "root": f"{storage.url}/{layout.root}",
            "pipeline": f"{storage.url}/{layout.final_pipeline}",
            "erasure": f"{storage.url}/{layout.erasure}",
            "cfr": f"{storage.url}/{layout.cfr_erasure}",
        },
        "model": p.request.model,
        # final/pipeline is the model's folder with only the edited tensors replaced: the
        # files rewritten, and those left out with the reason (a .bin copy of the weights).
        "pipeline_files": run.pipeline_files,
        "method": run.spec.method,
        "executor": run.backend.name,
        "workers": run.gpu_pool().summary(),
        "concepts": concepts,
        "whole_image_fallbacks": sum(int(n.get("whole_image_fallbacks", 0)) for n in notes.values()),
        "duplicates": p.concepts.duplicates,
        "erasure": {k: v for k, v in erasure.items() if k != "concepts"},
        **run.fusion_info,
        "prior_cache_hit": run.prior_cached,
        "data": {"made": run.data_made, "reused": run.data_reused},
        "settings": p.request.settings.to_dict(),
        "versions": versions(),
        "seconds": run.timer.seconds,
        "resumed": run.manifest.get("resumed", 0),
    }


def closing_summary(run: EraseRun) -> str:
    """The run's last progress line: time per stage, concepts trained/reused/re-queued, outputs."""
    seconds = run.timer.seconds
    stages = ", ".join(f"{name} {s:.1f}s" for name, s in seconds.items())
    requeued = run.pool.requeued_concepts if run.pool is not None else 0
    # A partial run that stops before the train stage trained nothing: its concepts are
    # left for the full run, so they must not read as trained.
    trained = len(run.todo) if any(st.name == "train" for st in run.stages) else 0
    return (
        f"run {run.p.run_id} {run.report['status']} in {sum(seconds.values()):.1f}s ({stages}); concepts: "
        f"{trained} trained, {len(run.done_before)} reused, {requeued} re-queued after a lost "
        f"worker; outputs: {run.report['output']['root']}"
    )
