"""The runtime that erase, eval and audit share: stages as data, run in order, timed once,
each held to its declaration.

A run is a list of ``Stage`` values. Each declares where its work runs (``Placement``:
the driver, CPU workers that hold only a text encoder, GPU workers that hold the whole
pipeline, or the statistics actor), what it reads and writes, and the completion marker
that lets a rerun skip finished work. ``run_stages`` runs them in order against a
context object (the run's state), timing each stage once on the driver, and holds each to
what it declares: its inputs must be there before it starts and its marker when it ends
(``mace_ray.engine.declared``), and the run's workers serve it only on the placements it
declares, in pools built from those placements (``mace_ray.engine.stage_workers``). A
stage that breaks its declaration fails with its name (``StageError``). The stage tables
of docs/ARCHITECTURE.md are rendered from these declarations (``stage_table``), and a
test keeps the two equal.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from mace_ray.engine.declared import Declared, Presence
from mace_ray.engine.metrics import Metrics
from mace_ray.storage.base import Storage

log = logging.getLogger("mace_ray")

Ctx = TypeVar("Ctx")


class Placement(str, enum.Enum):
    """Where a stage's work runs, and so which workers (and resources) it is given."""

    DRIVER = "driver"  # the driver process itself: planning, small reads and writes
    TEXT = "cpu text workers"  # CPU actors that load only the tokenizer and text encoder
    GPU = "gpu workers"  # actors holding the pipeline (and masker): generation, masks, training
    STATS = "statistics actor"  # one CPU actor holding the running sums; solves the closed forms


class StageError(RuntimeError):
    """A stage broke its declaration: an input missing before it started, its marker
    missing when it ended, or workers asked for that it does not declare. A bug of the
    stage (or storage changed under the run), not bad input: it fails the run (exit 1)."""


@dataclass(frozen=True)
class Stage(Generic[Ctx]):
    """One step of a run, as data: its name (in logs, metrics and report timings), where its
    jobs run (``placement``) and which other workers it calls (``calls``: the statistics
    actor's solves, a GPU worker's weights), what it reads and writes, how a rerun knows it
    is done (``marker``), and the code that plans its jobs and collects their results."""

    name: str
    placement: Placement
    reads: Declared[Ctx]
    writes: str
    marker: Declared[Ctx]  # there when the stage ends; what a rerun checks to skip finished work
    run: Callable[[Ctx], None]
    calls: tuple[Placement, ...] = ()

    @property
    def placements(self) -> tuple[Placement, ...]:
        return (self.placement, *self.calls)

    @property
    def runs_on(self) -> str:
        """For the docs table: 'statistics actor (and gpu workers)'."""
        also = ", ".join(p.value for p in self.calls)
        return self.placement.value + (f" (and {also})" if also else "")


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


class Serving(Protocol):
    """The run's workers (``mace_ray.engine.stage_workers.StageWorkers``), as run_stages uses them."""

    def serving(self, stage: Stage[Any], later: Sequence[Stage[Any]]) -> AbstractContextManager[None]: ...


class StagedRun(Protocol):
    """What run_stages needs of a run's state: where its files are, and its workers."""

    @property
    def storage(self) -> Storage: ...
    @property
    def workers(self) -> Serving: ...


def _check(stage: Stage[Ctx], what: Declared[Ctx], ctx: Ctx, presence: Presence, when: str) -> None:
    missing = what.missing(ctx, presence)
    if missing is not None:
        raise StageError(f"stage {stage.name}: {missing} is missing {when} ({what.text})")


def run_stages(
    stages: Sequence[Stage[Ctx]], ctx: Ctx, timer: Timer, presence: Presence | None = None
) -> None:
    """Run each stage in order, each timed once (driver-side wall time) and held to its
    declaration: its inputs checked before it starts, its marker when it ends, and its
    workers only those of the placements it declares (released after the last stage that
    declares them). Raises StageError naming the stage and the first thing missing.
    ``presence``: what the checks find, shared with stages that look for the same keys."""
    run: StagedRun = ctx  # type: ignore[assignment]
    presence = presence or Presence(run.storage)
    for i, stage in enumerate(stages):
        _check(stage, stage.reads, ctx, presence, "before it starts")
        with run.workers.serving(stage, stages[i + 1 :]), timer.stage(stage.name):
            stage.run(ctx)
        # A fresh look after the stage wrote; the next stage's inputs are checked from it too.
        presence.look()
        _check(stage, stage.marker, ctx, presence, "after it ended")


def stage_table(stages: Sequence[Stage[Any]]) -> str:
    """The stages as a Markdown table (docs/ARCHITECTURE.md shows the same)."""
    rows = ["| stage | runs on | reads | writes | done when |", "|---|---|---|---|---|"]
    for s in stages:
        cells = (f"`{s.name}`", s.runs_on, s.reads.text, s.writes, s.marker.text)
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows)
