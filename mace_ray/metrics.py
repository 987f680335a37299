"""Custom metrics for the Ray dashboard (Prometheus through Ray's metrics agent).

Created inside Ray processes only; the local executor uses ``NullMetrics``.
"""

from __future__ import annotations

from typing import Any, Protocol


class Metrics(Protocol):
    def concepts_done(self, n: int, run_id: str) -> None: ...
    def concepts_failed(self, n: int, run_id: str) -> None: ...
    def stage_seconds(self, stage: str, seconds: float, run_id: str) -> None: ...


class NullMetrics:
    def concepts_done(self, n: int, run_id: str) -> None:
        pass

    def concepts_failed(self, n: int, run_id: str) -> None:
        pass

    def stage_seconds(self, stage: str, seconds: float, run_id: str) -> None:
        pass


class RayMetrics:
    """mace_concepts_done / mace_concepts_failed counters, mace_stage_seconds counter by stage."""

    def __init__(self) -> None:
        from ray.util import metrics

        self._done: Any = metrics.Counter(
            "mace_concepts_done",
            description="Concepts whose LoRA and artefacts are stored.",
            tag_keys=("run",),
        )
        self._failed: Any = metrics.Counter(
            "mace_concepts_failed",
            description="Concepts whose batch was lost (worker or node died) and re-queued.",
            tag_keys=("run",),
        )
        self._seconds: Any = metrics.Counter(
            "mace_stage_seconds", description="Seconds spent per stage.", tag_keys=("run", "stage")
        )

    def concepts_done(self, n: int, run_id: str) -> None:
        self._done.inc(n, tags={"run": run_id})

    def concepts_failed(self, n: int, run_id: str) -> None:
        self._failed.inc(n, tags={"run": run_id})

    def stage_seconds(self, stage: str, seconds: float, run_id: str) -> None:
        self._seconds.inc(seconds, tags={"run": run_id, "stage": stage})


def make_metrics(kind: str) -> Metrics:
    return RayMetrics() if kind == "ray" else NullMetrics()
