"""The workers of a run, by placement, serving the stage that is running.

One adapter (``placement_shape``) turns a stage's declared ``Placement`` into workers: how
many and with which resources. Cpu text workers: 1 CPU and room for a text encoder, up to
MAX_TEXT_WORKERS and never more than the cluster's CPUs minus the driver's; gpu workers:
``worker_shape`` of the request's --workers / --gpus-per-worker; the statistics actor: one,
holding no CPU (it waits most of the time); the driver: none. ``StageWorkers`` builds each
pool from that shape the first time a stage asks for it, sends a stage's jobs to the
workers of its own placement unless it names one it declares in ``calls``, and refuses
(``StageError``, naming the stage) workers the stage does not declare and jobs the
placement's workers cannot serve. GPU workers (which load a pipeline for minutes) and the
statistics actor (which holds the sums) live until the last stage that declares them has
ended; text workers (seconds to load) only as long as their jobs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from mace_ray.engine.jobs import Job
from mace_ray.engine.pool import WorkerPool, worker_shape
from mace_ray.engine.resources import Resources
from mace_ray.engine.stages import Placement, Stage, StageError

log = logging.getLogger("mace_ray")

# The most CPU text workers a run starts.
MAX_TEXT_WORKERS = 8
# A CPU text worker: one core and room for a text encoder (OpenCLIP ViT-H is 1.4 GB in fp32).
TEXT_WORKER = Resources(cpus=1, memory_gb=2)
# The statistics actor: no CPU reserved (it waits on storage and solves in bursts).
STATS_ACTOR = Resources(cpus=0)
# How each placement's workers are named in logs (``workers:`` is the GPU pool's line).
LABELS = {Placement.TEXT: "text workers", Placement.GPU: "workers", Placement.STATS: "statistics actor"}


def placement_shape(placement: Placement, backend: Any, where: Any, n_jobs: int) -> tuple[int, Resources]:
    """How many workers of ``placement``, with which resources, for ``n_jobs`` jobs (module
    doc). ``where``: the request's --workers and --gpus-per-worker (``WhereItRuns``)."""
    if placement is Placement.DRIVER:
        raise ValueError("stages on the driver have no workers")
    if placement is Placement.GPU:
        return worker_shape(backend, where.workers, where.gpus_per_worker, n_jobs)
    if backend.name == "local":  # every worker is a plain object in this process
        return 1, Resources(cpus=0)
    if placement is Placement.TEXT:
        spare = int(backend.cpus_available()) - 1  # leave the driver's core
        return max(1, min(n_jobs, spare, MAX_TEXT_WORKERS)), TEXT_WORKER
    return 1, STATS_ACTOR


class StageWorkers:
    """The run's workers by placement (module doc). ``kinds``: the worker class of each
    placement the run uses and its actors' name prefix, e.g. ``{Placement.GPU:
    (ConceptWorker, "mace-worker")}``; every worker is built as ``cls(spec, name)`` (the
    statistics actor as ``cls(spec)``)."""

    def __init__(
        self,
        backend: Any,
        spec: Any,
        kinds: Mapping[Placement, tuple[type, str]],
        where: Any,
        session: str,
        run_id: str,
        metrics: str = "none",
    ) -> None:
        self.backend, self.spec, self.kinds, self.where = backend, spec, dict(kinds), where
        self.session, self.run_id, self.metrics = session, run_id, metrics
        self.stage: Stage[Any] | None = None  # the stage being served
        self.pools: dict[Placement, WorkerPool] = {}  # kept pools that are up
        self.built: dict[Placement, WorkerPool] = {}  # the last pool of each placement (summaries)
        self.actors: dict[Placement, Any] = {}

    # ------------------------------------------------------------ the stage being served

    @contextmanager
    def serving(self, stage: Stage[Any], later: Sequence[Stage[Any]]) -> Iterator[None]:
        """Serve ``stage``; then release the workers no later stage declares."""
        self.stage = stage
        try:
            yield
        finally:
            self.stage = None
            needed = {p for s in later for p in s.placements}
            for placement in [p for p in (*self.pools, *self.actors) if p not in needed]:
                self.release(placement)

    def _placement(self, placement: Placement | None, what: str) -> Placement:
        """``placement`` (default: the stage's own), if the stage being served declares it."""
        stage = self.stage
        if stage is None:
            raise StageError(f"{what}: workers are only for a running stage")
        placement = placement or stage.placement
        if placement is Placement.DRIVER:
            raise StageError(f"stage {stage.name}: {what}, but it runs on the driver: no workers")
        if placement not in stage.placements:
            declared = ", ".join(p.value for p in stage.placements)
            raise StageError(
                f"stage {stage.name}: {what} on the {placement.value}, but it declares {declared}"
            )
        if placement not in self.kinds:
            raise StageError(f"stage {stage.name}: this run has no {placement.value}")
        return placement

    def _servable(self, placement: Placement, jobs: Sequence[Job]) -> None:
        """Every job's method is one the placement's workers have: a stage declared on the
        wrong workers fails here, by name, before any job is sent."""
        cls = self.kinds[placement][0]
        for job in jobs:
            if not callable(getattr(cls, job.method, None)):
                stage = self.stage.name if self.stage is not None else "?"
                raise StageError(
                    f"stage {stage}: {type(job).__name__} jobs call {job.method}(), which "
                    f"{cls.__name__} ({placement.value}) does not have"
                )

    # ------------------------------------------------------------ pools and the actor

    def _build(self, placement: Placement, n_jobs: int) -> WorkerPool:
        cls, prefix = self.kinds[placement]
        n, resources = placement_shape(placement, self.backend, self.where, n_jobs)
        stage = self.stage.name if self.stage is not None else "?"
        log.info("%s: %d x %s (%s executor), %s for stage %s", LABELS[placement], n, resources,
                 self.backend.name, cls.__name__, stage)  # fmt: skip
        if placement is Placement.GPU:  # autoscaling clusters grow to what GPU stages can use
            self.backend.request_resources([resources.bundle()] * n)
        pool = WorkerPool(
            self.backend, cls, self.spec, resources, n, self.session, prefix, self.run_id, self.metrics
        )
        self.built[placement] = pool
        return pool

    def pool(self, placement: Placement | None = None, n_jobs: int = 1) -> WorkerPool:
        """The kept pool of ``placement`` (default: the stage's own), built for ``n_jobs`` on
        first use."""
        placement = self._placement(placement, "a worker pool")
        if placement is not Placement.GPU:
            raise StageError(f"the {placement.value} are no pool kept between jobs")
        if placement not in self.pools:
            self.pools[placement] = self._build(placement, n_jobs)
        return self.pools[placement]

    def run(
        self,
        jobs: list[Job],
        finished: Callable[[], set[str]] | None = None,
        placement: Placement | None = None,
    ) -> None:
        """Every job on the workers of ``placement`` (default: the stage's own); ``finished``
        as for ``WorkerPool.run``. Text workers start for these jobs and stop after them."""
        placement = self._placement(placement, "jobs")
        if placement is Placement.STATS:
            raise StageError(f"the {placement.value} takes calls, not jobs")
        self._servable(placement, jobs)
        if not jobs:
            return
        if placement is Placement.GPU:
            self.pool(placement, len(jobs)).run(jobs, finished)
            return
        pool = self._build(placement, len(jobs))
        try:
            pool.run(jobs, finished)
        finally:
            pool.shutdown()

    def ask_one(self, job: Job, placement: Placement | None = None) -> Any:
        """The result of ``job`` from any one worker of ``placement`` (kept pools)."""
        placement = self._placement(placement, "a job")
        self._servable(placement, [job])
        return self.pool(placement).ask_one(job)

    def broadcast(self, placement: Placement, method: str, *args: Any) -> None:
        """``method`` on every worker of a kept pool, now and on every replacement."""
        self.pool(self._placement(placement, f"{method}()")).broadcast(method, *args)

    def call(self, placement: Placement, method: str, *args: Any, task_name: str | None = None) -> Any:
        """A call on the one actor of ``placement`` (the statistics actor), started on first use."""
        placement = self._placement(placement, f"{method}()")
        if placement not in self.actors:
            cls, prefix = self.kinds[placement]
            _, resources = placement_shape(placement, self.backend, self.where, 1)
            name = f"{prefix}-{self.session}"
            self.actors[placement] = self.backend.spawn(cls, (self.spec,), resources, name, True)
        return self.backend.call(self.actors[placement], method, *args, task_name=task_name)

    # ------------------------------------------------------------ the end

    def release(self, placement: Placement) -> None:
        """Stop the workers of ``placement`` (a GPU pool's request to the autoscaler withdrawn)."""
        pool = self.pools.pop(placement, None)
        if pool is not None:
            pool.shutdown()
            self.backend.request_resources([])
        actor = self.actors.pop(placement, None)
        if actor is not None:
            self.backend.kill(actor)

    def close(self) -> None:
        """Every worker stopped, however the run ended."""
        for placement in [*self.pools, *self.actors]:
            self.release(placement)
