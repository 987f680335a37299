"""The runtime that erase and eval share: stages as data, run in order, timed once.

A run is a list of ``Stage`` values. Each declares where its work runs (``Placement``:
the driver, CPU workers that hold only a text encoder, GPU workers that hold the whole
pipeline, or the statistics actor), what it reads and writes, and the completion marker
that lets a rerun skip finished work. ``run_stages`` runs them in order against a
context object (the run's state), timing each stage once on the driver. The stage
tables of docs/ARCHITECTURE.md are rendered from these declarations (``stage_table``),
and a test keeps the two equal.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from mace_ray.engine.metrics import Metrics

log = logging.getLogger("mace_ray")

Ctx = TypeVar("Ctx")


class Placement(str, enum.Enum):
    """Where a stage's work runs, and so which resources it asks the cluster for."""

    DRIVER = "driver"  # the driver process itself: planning, small reads and writes
    TEXT = "cpu text workers"  # CPU actors that load only the tokenizer and text encoder
    GPU = "gpu workers"  # actors holding the pipeline (and masker): generation, masks, training
    STATS = "statistics actor"  # one CPU actor holding the running sums; solves the closed forms


@dataclass(frozen=True)
class Stage(Generic[Ctx]):
    """One step of a run, as data: its name (in logs, metrics and report timings), where it
    runs, what it reads and writes, how a rerun knows it is done, and the code that plans
    its jobs and collects their results."""

    name: str
    placement: Placement
    reads: str
    writes: str
    marker: str  # what a rerun checks to skip finished work
    run: Callable[[Ctx], None]


class Timer:
    """Seconds per stage, logged as progress lines of the job log and sent to the run's
    metrics (``report_to``). ``seconds`` includes the stage that is running, up to now: the
    last stage writes the report, which so names every stage the metrics name."""

    def __init__(self) -> None:
        self.done: dict[str, float] = {}
        self.running: tuple[str, float] | None = None  # the stage and when it started
        self.metrics: tuple[Metrics, str] | None = None  # where stages go, and the run id
        self.on_start: Callable[[str], None] | None = None  # e.g. the run lock's check

    @property
    def seconds(self) -> dict[str, float]:
        out = dict(self.done)
        if self.running is not None:
            name, t = self.running
            out[name] = round(out.get(name, 0.0) + time.perf_counter() - t, 3)
        return out

    def report_to(self, metrics: Metrics, run_id: str) -> None:
        """Send each stage to ``metrics`` from now on, and the stages timed before (prepare)."""
        self.metrics = (metrics, run_id)
        for name, seconds in self.done.items():
            metrics.stage_seconds(name, seconds, run_id)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self.on_start is not None:
            self.on_start(name)
        if self.metrics is not None:
            self.metrics[0].stage_started(name, self.metrics[1])
        t = time.perf_counter()
        self.running = (name, t)
        log.info("stage %s: started", name)
        try:
            yield
        finally:
            self.running = None
        dt = time.perf_counter() - t
        self.done[name] = round(self.done.get(name, 0.0) + dt, 3)
        log.info("stage %s: done in %.1fs", name, dt)
        if self.metrics is not None:
            self.metrics[0].stage_seconds(name, self.done[name], self.metrics[1])


class Reporting(Protocol):
    report: dict[str, Any]

    def write_report(self) -> dict[str, Any]: ...


def write_report(run: Reporting) -> None:
    """The last stage of eval and audit: their report files, kept on the run for the CLI."""
    run.report = run.write_report()


def run_stages(stages: Sequence[Stage[Ctx]], ctx: Ctx, timer: Timer) -> None:
    """Run each stage in order, each timed once (driver-side wall time)."""
    for stage in stages:
        with timer.stage(stage.name):
            stage.run(ctx)


def stage_table(stages: Sequence[Stage[Any]]) -> str:
    """The stages as a Markdown table (docs/ARCHITECTURE.md shows the same)."""
    rows = ["| stage | runs on | reads | writes | done when |", "|---|---|---|---|---|"]
    for s in stages:
        cells = (f"`{s.name}`", s.placement.value, s.reads, s.writes, s.marker)
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows)
