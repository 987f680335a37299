"""The driver of a job that is one stage table run to its report (audit, eval): the inputs
prepared (timed as the "prepare" stage), storage opened, the job's first record written, then
its stages on the executor's backend. Erase has its own driver: it also takes the run lock,
resumes and checks placement before anything is written.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

from mace_ray.engine.backend import Backend, backend_for
from mace_ray.engine.stage_workers import StageWorkers
from mace_ray.engine.stages import Stage, Timer, run_stages
from mace_ray.storage.base import Storage
from mace_ray.storage.open_store import NamesOutput, open_output


class JobRequest(NamesOutput, Protocol):
    """What the driver reads of a request (AuditRequest, EvalRequest)."""

    @property
    def executor(self) -> str: ...
    @property
    def address(self) -> str | None: ...


class PreparedJob(Protocol):
    """A job's checked inputs (PreparedAudit, PreparedEval): where its keys are, and the
    record it writes before any worker starts."""

    @property
    def layout(self) -> Any: ...
    def start(self, storage: Storage) -> None: ...


class StagedRun(Protocol):
    """The state the stages share (with the run's workers); the last stage leaves the job's
    report in it."""

    report: dict[str, Any]

    @property
    def storage(self) -> Storage: ...
    @property
    def workers(self) -> StageWorkers: ...


Req = TypeVar("Req", bound=JobRequest)
Prepared = TypeVar("Prepared", bound=PreparedJob)
Run = TypeVar("Run", bound=StagedRun)


def run_staged_job(
    req: Req,
    prepare: Callable[[Req], Prepared],
    make_run: Callable[[Backend, Prepared, Storage, Any, Timer], Run],
    stages: Sequence[Stage[Run]],
) -> dict[str, Any]:
    """Run the job; returns its report. ``prepare`` raises MaceError on bad input before
    anything is written."""
    timer = Timer()
    with timer.stage("prepare"):
        p = prepare(req)
    storage = open_output(req)
    p.start(storage)
    with backend_for(req.executor, req.address) as backend:
        run = make_run(backend, p, storage, p.layout, timer)
        try:
            run_stages(stages, run, timer)
        finally:
            run.workers.close()  # however the stages ended
        return run.report
