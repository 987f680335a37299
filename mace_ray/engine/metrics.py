"""Custom metrics for the Ray dashboard (Prometheus through Ray's metrics agent).

Recorded by the driver only (its stage timer and its worker pool), so that each value is
recorded once: a dashboard that sums a stage's time over processes gets the stage's wall
time, not the wall time plus every worker's share of it. The local executor uses
``NullMetrics``. Prometheus names carry Ray's ``ray_`` prefix (``EXPORTED``);
cluster/grafana/mace-ray.json is a dashboard of them.
"""

from __future__ import annotations

from typing import Any, Protocol

# name -> description; Prometheus sees ray_<name>.
METRICS = {
    "mace_concepts_total": "Concepts in the run.",
    "mace_concepts_done": "Concepts whose LoRA and artefacts are stored (reused ones included).",
    "mace_concepts_failed": "Concepts whose batch was lost (worker or node died) and re-queued.",
    "mace_stage_seconds": "Wall time of each finished stage, measured by the driver.",
    "mace_worker_concepts_per_second": "Concepts per second of each worker's last finished batch, per stage.",
}
EXPORTED = tuple(f"ray_{name}" for name in METRICS)


class Metrics(Protocol):
    def run_started(self, run_id: str, total: int, done: int) -> None: ...
    def concepts_done(self, done: int, run_id: str) -> None: ...
    def concepts_failed(self, n: int, run_id: str) -> None: ...
    def stage_started(self, stage: str, run_id: str) -> None: ...
    def stage_seconds(self, stage: str, seconds: float, run_id: str) -> None: ...
    def worker_throughput(self, worker: str, per_second: float, run_id: str) -> None: ...


class NullMetrics:
    def run_started(self, run_id: str, total: int, done: int) -> None:
        pass

    def concepts_done(self, done: int, run_id: str) -> None:
        pass

    def concepts_failed(self, n: int, run_id: str) -> None:
        pass

    def stage_started(self, stage: str, run_id: str) -> None:
        pass

    def stage_seconds(self, stage: str, seconds: float, run_id: str) -> None:
        pass

    def worker_throughput(self, worker: str, per_second: float, run_id: str) -> None:
        pass


class RayMetrics:
    """Gauges, so that a value is what it says at any time (done/total gives the fraction,
    failed exists from the start at 0). The run's counts are set again with every update:
    a value recorded in the first moments after the driver connects can be lost, and a
    gauge recorded only then would never appear. The stages' seconds and the workers'
    throughputs are set again with them: a series left unset for a while is not exported
    (measured: only the last two stages' throughputs reached Prometheus). A throughput is
    tagged with the stage the driver's timer is in (the stages run one after another, each its
    own kind of work: text statistics, images, training)."""

    def __init__(self) -> None:
        from ray.util import metrics

        def gauge(name: str, *tags: str) -> Any:
            return metrics.Gauge(name, description=METRICS[name], tag_keys=("run", *tags))

        self._total = gauge("mace_concepts_total")
        self._done = gauge("mace_concepts_done")
        self._failed = gauge("mace_concepts_failed")
        self._seconds = gauge("mace_stage_seconds", "stage")
        self._throughput = gauge("mace_worker_concepts_per_second", "stage", "worker")
        self._counts: dict[str, dict[str, int]] = {}  # run -> total, done, failed
        self._stages: dict[str, dict[str, float]] = {}  # run -> stage -> seconds
        self._running: dict[str, str] = {}  # run -> the stage running now
        self._rates: dict[str, dict[tuple[str, str], float]] = {}  # run -> (stage, worker) -> rate

    def _set_counts(self, run_id: str, **change: int) -> None:
        counts = self._counts.setdefault(run_id, {"total": 0, "done": 0, "failed": 0})
        counts.update(change)
        tags = {"run": run_id}
        self._total.set(counts["total"], tags=tags)
        self._done.set(counts["done"], tags=tags)
        self._failed.set(counts["failed"], tags=tags)
        for stage, seconds in self._stages.get(run_id, {}).items():
            self._seconds.set(seconds, tags={"run": run_id, "stage": stage})
        for (stage, worker), rate in self._rates.get(run_id, {}).items():
            self._throughput.set(rate, tags={"run": run_id, "stage": stage, "worker": worker})

    def run_started(self, run_id: str, total: int, done: int) -> None:
        self._set_counts(run_id, total=total, done=done, failed=0)

    def concepts_done(self, done: int, run_id: str) -> None:
        self._set_counts(run_id, done=done)

    def concepts_failed(self, n: int, run_id: str) -> None:
        failed = self._counts.get(run_id, {}).get("failed", 0) + n
        self._set_counts(run_id, failed=failed)

    def stage_started(self, stage: str, run_id: str) -> None:
        self._running[run_id] = stage

    def stage_seconds(self, stage: str, seconds: float, run_id: str) -> None:
        self._stages.setdefault(run_id, {})[stage] = seconds
        self._set_counts(run_id)

    def worker_throughput(self, worker: str, per_second: float, run_id: str) -> None:
        self._rates.setdefault(run_id, {})[self._running.get(run_id, ""), worker] = per_second
        self._set_counts(run_id)


_ray_metrics: RayMetrics | None = None


def make_metrics(kind: str) -> Metrics:
    """One RayMetrics per process (the driver's timer and pool share it)."""
    global _ray_metrics
    if kind != "ray":
        return NullMetrics()
    if _ray_metrics is None:
        _ray_metrics = RayMetrics()
    return _ray_metrics
