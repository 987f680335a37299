"""The state the stages of one erase run share (``EraseRun``): inputs, storage, worker pools
and the results each stage leaves for the next (mace_ray/erase/stages.py)."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from mace_core.concepts import Concept
from mace_core.text_stats import second_moment_from_bytes
from mace_ray.engine.backend import Backend
from mace_ray.engine.jobs import Job
from mace_ray.engine.metrics import make_metrics
from mace_ray.engine.pool import WorkerPool
from mace_ray.engine.resources import Resources
from mace_ray.engine.stages import Timer, run_stages
from mace_ray.erase import artefacts
from mace_ray.erase.layout import RunLayout
from mace_ray.erase.spec import RunSpec
from mace_ray.erase.stats_worker import StatsWorker
from mace_ray.erase.text_worker import TextWorker
from mace_ray.storage.base import Storage, write_json
from mace_ray.storage.lease import RunLock

log = logging.getLogger("mace_ray")

# The most CPU text workers a run starts.
MAX_TEXT_WORKERS = 8
# A CPU text worker: one core and room for a text encoder (OpenCLIP ViT-H is 1.4 GB in fp32).
TEXT_WORKER = Resources(cpus=1, memory_gb=2)


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
        self.pool: WorkerPool | None = None
        self.stats: Any = None
        self.prior_cached = False
        self.cfr_solve: Any = None
        self.original: Any = None
        self.fused: Any = None
        self.fusion_info: dict[str, Any] = {}
        self.outputs: dict[str, str] = {}
        # What writing final/pipeline did: files copied, rewritten, left out (and why).
        self.pipeline_files: dict[str, Any] = {}
        self.erasure: dict[str, Any] = {}
        self.report: dict[str, Any] = {}
        # Concepts whose images and masks this run made, and those it found stored (shared
        # by content address, possibly made by another run); None until the data stage.
        self.data_made: int | None = None
        self.data_reused: int | None = None

    # ------------------------------------------------------------ pools

    def text_pool(self, n_jobs: int) -> WorkerPool:
        """CPU workers with only the text encoder: one per job up to the cluster's spare CPUs."""
        if self.backend.name == "local":
            n, resources = 1, Resources(cpus=0)
        else:
            spare = int(self.backend.cpus_available()) - 1  # leave the driver's core
            n, resources = max(1, min(n_jobs, spare, MAX_TEXT_WORKERS)), TEXT_WORKER
        log.info("text workers: %d x %s (%s executor)", n, resources, self.backend.name)
        return self._pool(TextWorker, resources, n, "mace-text")

    def _pool(self, cls: type, resources: Resources, n: int, prefix: str) -> WorkerPool:
        return WorkerPool(
            self.backend, cls, self.spec, resources, n, self.session, prefix, self.p.run_id, self.backend.name
        )

    def run_text_jobs(self, jobs: list[Job]) -> None:
        if not jobs:
            return
        pool = self.text_pool(len(jobs))
        try:
            pool.run(jobs)
        finally:
            pool.shutdown()

    def gpu_pool(self) -> WorkerPool:
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
        """Every stage; the pools and the statistics actor are shut down however it ends."""
        self.metrics.run_started(self.p.run_id, len(self.concepts), len(self.done_before))
        # Before any shared artefact is made or reused: what this run refers to (mace-ray gc).
        data = (
            {c.slug: self.spec.data_layout(c).key for c in self.concepts} if self.p.method == "mace" else {}
        )
        write_json(self.storage, self.layout.refs, {"data": data})
        self.stats = self.backend.spawn(
            StatsWorker, (self.spec,), Resources(cpus=0), f"mace-stats-{self.session}", True
        )
        try:
            run_stages(self.stages, self, self.timer)
        finally:
            if self.pool is not None:
                self.pool.shutdown()
            self.backend.kill(self.stats)
            self.backend.request_resources([])
        return self.report
