"""The state the stages of one erase run share (``EraseRun``): inputs, storage, the run's
workers by placement (``StageWorkers``: which class serves each placement; the stages'
declarations say where each stage runs) and the results each stage leaves for the next
(mace_ray/erase/stages.py)."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from mace_core.concepts import Concept
from mace_core.text_stats import second_moment_from_bytes
from mace_ray.engine.backend import Backend
from mace_ray.engine.declared import Presence
from mace_ray.engine.metrics import make_metrics
from mace_ray.engine.pool import WorkerPool
from mace_ray.engine.stage_workers import StageWorkers
from mace_ray.engine.stages import Placement, Timer, run_stages
from mace_ray.erase import artefacts
from mace_ray.erase.concept_worker import ConceptWorker
from mace_ray.erase.layout import RunLayout
from mace_ray.erase.spec import RunSpec
from mace_ray.erase.stats_worker import StatsWorker
from mace_ray.erase.text_worker import TextWorker
from mace_ray.storage.base import Storage, write_json
from mace_ray.storage.lease import RunLock

log = logging.getLogger("mace_ray")

# The worker class of each placement of an erase run, and its actors' name prefix.
ERASE_WORKERS = {
    Placement.TEXT: (TextWorker, "mace-text"),
    Placement.GPU: (ConceptWorker, "mace-worker"),
    Placement.STATS: (StatsWorker, "mace-stats"),
}


class EraseRun:
    """The state the stages of one erase run share: inputs, storage, pools, results."""

    def __init__(
        self,
        backend: Backend,
        prepared: Any,  # mace_ray.erase.driver.Prepared
        storage: Storage,
        layout: RunLayout,
        timer: Timer,
        manifest: dict[str, Any],
        lock: RunLock | None = None,
    ) -> None:
        self.backend, self.p, self.storage, self.layout = backend, prepared, storage, layout
        self.timer, self.manifest, self.lock = timer, manifest, lock
        req = prepared.request
        self.spec = RunSpec(
            run_id=prepared.run_id,
            model=req.model,
            output=req.output,
            settings=req.settings,
            prior_key=prepared.prior_key,
            model_fingerprint=prepared.model_fingerprint,
            profile=prepared.profile,
            metrics=backend.name,
            **req.for_workers(),
            method=prepared.method,
            lease=lock.ref if lock is not None else None,  # every worker write checks it
        )
        self.stages = prepared.stages
        self.concepts: list[Concept] = prepared.concepts.concepts
        self.slugs = [c.slug for c in self.concepts]
        # Actor names must be unique in the cluster: a killed driver's actors may linger a moment.
        self.session = f"{prepared.run_id[:8]}-{uuid.uuid4().hex[:6]}"
        self.metrics = make_metrics(backend.name)
        timer.report_to(self.metrics, prepared.run_id)
        # A concept is reused only if its LoRA and notes match the checksums of its marker.
        # A closed-form-only run trains nothing.
        self.done_before = artefacts.verified_done(storage, layout) if prepared.method == "mace" else set()
        self.todo = (
            [c for c in self.concepts if c.slug not in self.done_before] if prepared.method == "mace" else []
        )
        self.batch_size = req.concepts_per_batch or 1
        self.workers = StageWorkers(
            backend, self.spec, ERASE_WORKERS, req, self.session, prepared.run_id, backend.name
        )
        # What storage holds as the runtime's checks found it; stages that look for the same
        # keys ask it (the data stage's markers: asked once, not again when the stage ends).
        self.presence = Presence(storage)
        # What each stage leaves for the next (None until then: stages declare what they need).
        self.prior_cached = False
        self.cfr_solve: Any = None  # the CFR solve the statistics actor started (text_statistics)
        self.original: Any = None
        self.fused: Any = None
        self.fusion_info: dict[str, Any] = {}
        self.outputs: dict[str, str] = {}
        # What writing final/pipeline did: files copied, rewritten, left out (and why).
        self.pipeline_files: dict[str, Any] = {}
        self.erasure: dict[str, Any] | None = None
        self.report: dict[str, Any] = {}
        # Concepts whose images and masks this run made, and those it found stored (shared
        # by content address, possibly made by another run); None until the data stage.
        self.data_made: int | None = None
        self.data_reused: int | None = None

    # ------------------------------------------------------------ what stages use

    @property
    def pool(self) -> WorkerPool | None:
        """The GPU workers' pool once started (stage workers_start), kept for its summary."""
        return self.workers.built.get(Placement.GPU)

    def gpu_pool(self) -> WorkerPool:
        """The GPU workers' pool, for the report (stages send jobs through ``workers``)."""
        assert self.pool is not None, "the GPU workers start in stage workers_start"
        return self.pool

    def reusable_stats(self, key: str) -> bool:
        what = f"{self.storage.url}/{key}"
        return artefacts.reusable(self.storage, key, lambda b: second_moment_from_bytes(b, what))

    def finished(self) -> set[str]:
        return artefacts.done_slugs(self.storage, self.layout)

    def batches(self, concepts: list[Concept]) -> list[list[Concept]]:
        k = self.batch_size
        return [concepts[i : i + k] for i in range(0, len(concepts), k)]

    def run(self) -> dict[str, Any]:
        """Every stage; the workers and the statistics actor are shut down however it ends."""
        self.metrics.run_started(self.p.run_id, len(self.concepts), len(self.done_before))
        # Before any shared artefact is made or reused: what this run refers to (mace-ray gc).
        data = (
            {c.slug: self.spec.data_layout(c).key for c in self.concepts} if self.p.method == "mace" else {}
        )
        write_json(self.storage, self.layout.refs, {"data": data})
        try:
            run_stages(self.stages, self, self.timer, self.presence)
        finally:
            self.workers.close()
        return self.report
