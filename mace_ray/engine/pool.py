"""A pool of workers of one kind with bounded in-flight work and replacement of dead workers.

Jobs (``mace_ray.engine.jobs``) are method calls on any worker. One job per worker is in flight
at a time; the driver waits on whichever finishes first (never a ``get`` over
everything). A worker lost to an infrastructure failure (dead actor, dead node) is
replaced and its job re-queued, minus the concepts that the stage's completion marker
says are finished; an application error fails the run at once.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from mace_ray.engine.jobs import ConceptJob, Job
from mace_ray.engine.metrics import make_metrics
from mace_ray.engine.resources import Resources

log = logging.getLogger("mace_ray")

MAX_ATTEMPTS = 3
# A stage that runs long says where it is at least this often (seconds).
PROGRESS_EVERY_S = 30.0


class WorkerPool:
    """``size`` workers ``worker_cls(spec, name)``, each with a ``setup()`` that loads its
    models and returns where it runs (and optionally ``teardown()``)."""

    def __init__(
        self,
        backend: Any,
        worker_cls: type,
        spec: Any,
        resources: Resources,
        size: int,
        session: str,
        name_prefix: str,
        run_id: str,
        metrics: str = "none",
    ) -> None:
        self.worker_cls = worker_cls
        self.name_prefix = name_prefix
        self.backend = backend
        self.session = session
        self.spec = spec
        self.run_id = run_id
        self.resources = resources
        self.size = size
        self.next_id = 0
        self.idle: list[tuple[int, Any]] = []
        self.starting: dict[Any, tuple[int, Any]] = {}  # ready() ref -> worker
        self.busy: dict[Any, tuple[int, Any, Job]] = {}  # job ref -> worker, job
        self.dispatched: dict[Any, float] = {}  # job ref -> when it was sent (throughput)
        self.init_calls: list[tuple[str, tuple]] = []
        self.replaced = 0
        self.requeued_concepts = 0  # concepts of batches lost with their worker
        self.where: dict[str, dict] = {}
        self.metrics = make_metrics(metrics)
        # The stage's completion marker: which concepts are finished (for re-queueing).
        self.finished_concepts: Callable[[], set[str]] = set
        for _ in range(size):
            self._spawn()

    def _spawn(self) -> None:
        i = self.next_id
        self.next_id += 1
        name = f"{self.name_prefix}-{self.session}-{i}"
        handle = self.backend.spawn(self.worker_cls, (self.spec, name), self.resources, name)
        # Actor calls run in order: setup first, then what every worker has been told so far.
        ready = self.backend.call(handle, "setup", task_name=f"{name}.setup")
        for method, args in self.init_calls:
            self.backend.call(handle, method, *args)
        self.starting[ready] = (i, handle)

    def _replace(self, i: int, handle: Any, why: BaseException) -> None:
        self.replaced += 1
        if self.replaced > MAX_ATTEMPTS * (self.size + 1):
            raise RuntimeError(f"too many worker failures ({self.replaced}); last: {why}") from why
        log.warning("worker %d lost (%s); starting a replacement", i, type(why).__name__)
        self.backend.kill(handle)
        self._spawn()

    def broadcast(self, method: str, *args: Any) -> None:
        """Call ``method`` on every worker, now and on every future replacement."""
        self.init_calls.append((method, args))
        refs = []
        for _, h in self.idle:
            refs.append(self.backend.call(h, method, *args))
        for _, h in self.starting.values():
            self.backend.call(h, method, *args)
        for ref in refs:
            self.backend.get(ref)

    def _started(self, ref: Any) -> None:
        """A worker's setup finished: idle, or replaced if its node or process was lost."""
        i, h = self.starting.pop(ref)
        try:
            self.where[str(i)] = self.backend.get(ref)
            self.idle.append((i, h))
        except Exception as e:
            if not self.backend.is_infrastructure_error(e):
                raise
            self._replace(i, h, e)

    def wait_started(self) -> None:
        """Until a first worker has loaded its models (its own stage in the timings, so that
        model loading is not billed to the first stage that needs a worker). Not all of
        them: a worker the cluster cannot place yet waits for the autoscaler, and the work
        starts without it."""
        while self.starting and not self.idle:
            ready, _ = self.backend.wait(list(self.starting))
            for ref in ready:
                self._started(ref)

    def run(self, jobs: list[Job], finished: Callable[[], set[str]] | None = None) -> None:
        """Run every job on some worker; returns when all are done. A progress line at least
        every PROGRESS_EVERY_S seconds says how many jobs are done and running.

        ``finished``: the slugs whose completion marker is there, for jobs over concepts
        that must be re-queued after a lost worker (only the unfinished concepts go again).
        """
        self.finished_concepts = finished or set
        queue: deque[Job] = deque(jobs)
        total, finished = len(jobs), 0
        last_line = time.monotonic()
        while queue or self.busy:
            while queue and self.idle:
                job = queue.popleft()
                i, h = self.idle.pop()
                job.attempts += 1
                ref = self.backend.call(h, job.method, *job.args(), task_name=f"{job.label}@w{i}")
                self.busy[ref] = (i, h, job)
                self.dispatched[ref] = time.monotonic()
            waiting = list(self.busy) + list(self.starting)
            if not waiting:
                raise RuntimeError("no concept worker is alive or starting")
            ready, _ = self.backend.wait(waiting, timeout=PROGRESS_EVERY_S)
            if time.monotonic() - last_line >= PROGRESS_EVERY_S:
                running = ", ".join(job.label for _, _, job in list(self.busy.values())[:3])
                log.info("  %d/%d jobs done, %d running (%s)", finished, total, len(self.busy), running)
                last_line = time.monotonic()
            for ref in ready:
                if ref in self.starting:
                    self._started(ref)
                    continue
                i, h, job = self.busy.pop(ref)
                sent = self.dispatched.pop(ref, None)
                try:
                    result = self.backend.get(ref)
                except Exception as e:
                    if not self.backend.is_infrastructure_error(e):
                        raise
                    self._requeue(queue, job, e)
                    self._replace(i, h, e)
                    continue
                self.idle.append((i, h))
                finished += 1
                if isinstance(job, ConceptJob) and sent is not None:
                    seconds = max(time.monotonic() - sent, 1e-6)
                    self.metrics.worker_throughput(f"w{i}", len(job.concepts) / seconds, self.run_id)
                if job.on_done is not None:
                    job.on_done(job, result)

    def _requeue(self, queue: deque[Job], job: Job, why: BaseException) -> None:
        if isinstance(job, ConceptJob):
            self.requeued_concepts += len(job.concepts)
            self.metrics.concepts_failed(len(job.concepts), self.run_id)
        if job.attempts >= MAX_ATTEMPTS:
            raise RuntimeError(f"{job.label} failed {job.attempts} times; last: {why}") from why
        if isinstance(job, ConceptJob):
            done = self.finished_concepts()
            rest = job.without(done)
            finished = [c for c in job.concepts if c.slug in done]
            if finished and job.on_done is not None:
                part = dataclasses.replace(job, concepts=finished, label=job.label + " (before the failure)")
                job.on_done(part, None)
            if rest is None:
                return
            job = rest
        log.warning("re-queueing %s (attempt %d)", job.label, job.attempts + 1)
        queue.appendleft(job)

    def ask_one(self, job: Job) -> Any:
        """The result of ``job`` from any one worker (e.g. its batch plan)."""
        box: list[Any] = []
        job.on_done = lambda j, result: box.append(result)
        self.run([job])
        return box[0]

    def summary(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "replaced": self.replaced,
            "resources": vars(self.resources),
            "where": self.where,
        }

    def shutdown(self) -> None:
        for _, h in self.idle:
            self.backend.kill(h)
        for _, h, _ in self.busy.values():
            self.backend.kill(h)
        for _, h in self.starting.values():
            self.backend.kill(h)
        self.idle.clear()
        self.busy.clear()
        self.starting.clear()


def worker_shape(
    backend: Any, workers: int | None, gpus_per_worker: float | None, n_jobs: int
) -> tuple[int, Resources]:
    """How many workers, with which resources: one per GPU of the cluster unless told.

    ``gpus_per_worker`` None: 1 when the cluster has GPUs, else CPU workers. ``workers``
    None: as many as the GPUs allow (1 on a CPU cluster). Never more than there are jobs.
    """
    if backend.name == "local":
        return 1, Resources(cpus=0)
    available = backend.gpus_available()
    gpus = gpus_per_worker if gpus_per_worker is not None else (1.0 if available else 0.0)
    if workers is not None:
        n = workers
    elif gpus > 0:
        n = max(1, int(available // gpus))
    else:
        n = 1
    return max(1, min(n, n_jobs)), Resources(cpus=1, gpus=gpus)
