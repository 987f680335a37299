"""The stages of an audit (after ``prepare``), as data, and the state they share.

One job per concept for its plain-prompt baseline and one per (concept, attack), on GPU
workers that hold both pipelines; a job whose stored result still holds (its marker and
the checksums it lists) is not run again. The driver then writes the report.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from mace_core.audit.report import markdown_summary, report_plots, summarize
from mace_ray.audit.jobs import AuditAttack, AuditBaseline
from mace_ray.audit.layout import BASELINE, AuditLayout
from mace_ray.audit.worker import AuditSpec, AuditWorker, has_explicit, verified_result
from mace_ray.engine.backend import Backend
from mace_ray.engine.declared import given, stored
from mace_ray.engine.jobs import Job
from mace_ray.engine.pool import WorkerPool
from mace_ray.engine.provenance import versions
from mace_ray.engine.report_files import write_report_files
from mace_ray.engine.stage_workers import StageWorkers
from mace_ray.engine.stages import Placement, Stage, Timer, write_report
from mace_ray.storage.base import Storage, read_json
from mace_ray.storage.open_store import absolute_output

log = logging.getLogger("mace_ray")


class AuditRun:
    """The state the stages of one audit share."""

    def __init__(self, backend: Backend, p: Any, storage: Storage, layout: AuditLayout, timer: Timer) -> None:
        # p: mace_ray.audit.driver.PreparedAudit (not imported: audit imports this module)
        self.backend, self.p, self.storage, self.layout, self.timer = backend, p, storage, layout, timer
        req = p.request
        n_attacks = len(p.attacks)
        budget = req.settings.budget_s
        self.spec = AuditSpec(
            audit_id=p.audit_id,
            model=p.model.load,
            original=p.original,
            output=absolute_output(req.output),
            settings=req.settings,
            budget_per_attack_s=None if budget is None else budget / max(1, n_attacks),
            run_output=p.run_output,
            run_id=p.run_id,
            explicit=has_explicit(p.concepts),
            clip=p.clip,
            under_ray=backend.name == "ray",
            **req.for_workers(),
        )
        self.session = f"{p.audit_id[:8]}-{uuid.uuid4().hex[:6]}"
        workers = {Placement.GPU: (AuditWorker, "mace-audit")}
        self.workers = StageWorkers(backend, self.spec, workers, req, self.session, p.audit_id)
        self.reused = 0
        self.report: dict[str, Any] = {}

    @property
    def pool(self) -> WorkerPool | None:
        """The GPU workers' pool if any job ran, kept for the report's summary."""
        return self.workers.built.get(Placement.GPU)

    def jobs(self) -> list[Job]:
        """A baseline job per concept and a job per (concept, attack), minus those already done."""
        todo: list[Job] = []
        total = len(self.p.concepts) * (1 + len(self.p.attacks))
        progress = {"done": 0}

        def finished(job: Job, result: dict[str, Any]) -> None:
            progress["done"] += 1
            figures = result.get("plain") or result.get("result") or {}
            log.info("audit: %d/%d jobs done (%s: leak %.3f)", progress["done"] + self.reused, total,
                     job.label, figures.get("leak", float("nan")))  # fmt: skip

        for c in self.p.concepts:
            planned: list[Job] = [AuditBaseline(c, label=f"{BASELINE}[{c.slug}]", on_done=finished)]
            planned += [AuditAttack(c, a, label=f"{a}[{c.slug}]", on_done=finished) for a in self.p.attacks]
            for job in planned:
                name = job.attack if isinstance(job, AuditAttack) else BASELINE
                if self.p.request.resume and verified_result(self.storage, self.layout.result(c.slug, name)):
                    self.reused += 1
                    continue
                todo.append(job)
        return todo

    def write_report(self) -> dict[str, Any]:
        p, storage, layout = self.p, self.storage, self.layout
        baselines = [read_json(storage, layout.result(c.slug, BASELINE)) for c in p.concepts]
        results = {
            c.slug: {a: read_json(storage, layout.result(c.slug, a)) for a in p.attacks} for c in p.concepts
        }
        body = summarize(baselines, results, p.attacks, p.request.settings.success_leak)
        report: dict[str, Any] = {
            "audit_id": p.audit_id,
            "status": "complete",
            "model": {"name": p.model.spec, "loaded_from": p.model.load, "erase_run": p.run_id},
            "original": p.original,
            "settings": p.request.settings.to_dict(),
            "budget_per_attack_s": self.spec.budget_per_attack_s,
            "scorer": {"clip": p.clip if p.request.settings.images else None},
            "notes": list(p.notes),
            **body,
            "jobs": {"total": len(p.concepts) * (1 + len(p.attacks)), "reused": self.reused},
            "executor": self.backend.name,
            "workers": self.pool.summary() if self.pool is not None else None,
            "versions": versions(),
            "seconds": self.timer.seconds,
        }
        return write_report_files(storage, layout, report, report_plots, markdown_summary)


def attacks_stage(run: AuditRun) -> None:
    jobs = run.jobs()
    if run.reused:
        log.info("audit: %d jobs reused from an earlier audit with the same inputs", run.reused)
    run.workers.run(jobs)  # no worker starts when every result was reused


def job_results(run: AuditRun) -> list[str]:
    """Every job's completion marker: the baseline and each attack, of every concept."""
    names = (BASELINE, *run.p.attacks)
    return [run.layout.result(c.slug, name) for c in run.p.concepts for name in names]


AUDIT_STAGES: tuple[Stage[AuditRun], ...] = (
    Stage(
        "attacks",
        Placement.GPU,
        reads=given(
            "both models, the concepts (with their variants), the erase run's stored images "
            "(checked by prepare)"
        ),
        writes="audits/<audit id>/jobs/<slug>/<job>.json (and .safetensors), images/<slug>/<set>/",
        marker=stored("each job's JSON, with the checksums of its embeddings and images", job_results),
        run=attacks_stage,
    ),
    Stage(
        "report",
        Placement.DRIVER,
        reads=stored("every job's JSON", job_results),
        writes="audits/<audit id>/report.json, summary.md, plots",
        marker=stored(
            "report.json, summary.md (written again on a rerun: seconds)",
            lambda run: [run.layout.report, run.layout.summary],
        ),
        run=write_report,
    ),
)
