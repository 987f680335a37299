"""The stages of an erase run (after ``prepare``), as data.

``ERASE_STAGES`` is the run: each ``Stage`` says where it runs, what it reads and writes
and the marker it leaves (the runtime checks them, ``mace_ray.engine.stages``), and its
function plans typed jobs (``mace_ray.engine.jobs``) for the workers of its placement
(``run.workers``). The statistics actor starts solving CFR as soon as the text statistics
are in, so images and masks (which need only the original model) never wait for the
closed form.
"""

from __future__ import annotations

import logging
from typing import Any

from mace_core.concepts import Concept
from mace_core.erasure_report import summarize as erasure_summary
from mace_core.erasure_report import summary_line
from mace_core.errors import ArtefactError
from mace_core.fingerprint import expect_fingerprint
from mace_core.prompts import heldout_prompts
from mace_ray.engine.declared import given, state, stored
from mace_ray.engine.jobs import Job, concept_label
from mace_ray.engine.stages import Placement, Stage
from mace_ray.erase import artefacts
from mace_ray.erase.jobs import (
    BatchPlan,
    ConceptReport,
    DriftReport,
    OriginalWeights,
    PrepareData,
    PriorStats,
    PromptStats,
    TextStats,
    TrainConcepts,
    WriteFinal,
)
from mace_ray.erase.layout import prior_cache_path
from mace_ray.erase.run import EraseRun
from mace_ray.erase.run_report import run_report
from mace_ray.storage.base import json_bytes, write_json

log = logging.getLogger("mace_ray")

# Concepts per text-statistics job.
TEXT_CHUNK = 64


def text_stats_jobs(concepts: list[Concept]) -> list[Job]:
    return [
        TextStats(
            concepts[i : i + TEXT_CHUNK], label=f"text-stats[{i}:{i + len(concepts[i : i + TEXT_CHUNK])}]"
        )
        for i in range(0, len(concepts), TEXT_CHUNK)
    ]


# ------------------------------------------------------------------ the stages


def text_statistics(run: EraseRun) -> None:
    p, layout = run.p, run.layout
    jobs: list[Job] = []
    run.prior_cached = run.reusable_stats(prior_cache_path(p.prior_key))
    if not run.prior_cached:
        jobs.append(PriorStats(p.captions, label="prior"))
    for key, prompts, label in (
        (layout.domain_stats, p.domain_prompts(), "domain-set"),
        (layout.retain_stats, p.retain_prompts(), "retained-set"),
    ):
        if prompts and not run.reusable_stats(key):
            jobs.append(PromptStats(key, prompts, label=label))
    have = artefacts.slugs_with(run.storage, layout, "stats.safetensors")
    missing = [c for c in run.concepts if c.slug not in have]
    run.workers.run(jobs + text_stats_jobs(missing))
    log.info(
        "text_statistics: %d concepts computed, %d reused", len(missing), len(run.concepts) - len(missing)
    )
    # The statistics actor solves CFR while the GPU workers start and make images and masks.
    run.cfr_solve = run.workers.call(Placement.STATS, "solve_cfr", run.slugs, task_name="cfr-solve")


def text_statistics_files(run: EraseRun) -> list[str]:
    """What text_statistics leaves: every concept's statistics, the prior's (shared cache),
    and those of the domain and retained sets where the run has such prompts."""
    layout = run.layout
    keys = [layout.stats(slug) for slug in run.slugs] + [prior_cache_path(run.p.prior_key)]
    keys += [layout.domain_stats] if run.p.domain_prompts() else []
    return keys + ([layout.retain_stats] if run.p.retain_prompts() else [])


def workers_start(run: EraseRun) -> None:
    """Start the GPU workers and wait until a first one has loaded its models."""
    req = run.p.request
    pool = run.workers.pool(n_jobs=max(1, len(run.batches(run.todo))))
    pool.wait_started()
    if run.todo and req.concepts_per_batch is None:
        # Concepts per batch from what a worker's free memory holds, capped so that the
        # concepts spread over every worker of the pool.
        plan = run.workers.ask_one(BatchPlan(label="batch-plan"))
        run.batch_size = max(1, min(plan["concepts_per_batch"], -(-len(run.todo) // pool.size)))
        log.info(
            "concepts per batch: %d (auto; one worker's memory holds %d)",
            run.batch_size,
            plan["concepts_per_batch"],
        )


def data(run: EraseRun) -> None:
    """Images and masks of the concepts to train, unless stored under their content address
    (by this run before it was stopped, or by any other run over the same model and data
    settings: a run that adds concepts to an earlier one makes only the new concepts' data)."""
    where = {c.slug: run.spec.data_layout(c).marker for c in run.todo}
    # data/ holds every run's images and masks: asked one by one (in parallel), not listed.
    absent = set(run.presence.missing(list(where.values()), listing=False))
    need = [c for c in run.todo if where[c.slug] in absent]
    jobs = [PrepareData(b, label=concept_label("data", b)) for b in run.batches(need)]
    run.workers.run(jobs, run.finished)
    run.data_made, run.data_reused = len(need), len(run.todo) - len(need)
    log.info("data: images and masks of %d concepts made, %d reused", run.data_made, run.data_reused)


def cfr(run: EraseRun) -> None:
    backend, workers = run.backend, run.workers
    M, damaged = backend.get(run.cfr_solve)
    if damaged:
        # Checked where they are read (the statistics actor reads them all anyway): damaged
        # statistics are computed again, never trusted and never fatal.
        log.warning("statistics of %d concepts are damaged; computing them again", len(damaged))
        for slug in damaged:
            run.storage.delete_prefix(run.layout.stats(slug))
        redo = text_stats_jobs([c for c in run.concepts if c.slug in set(damaged)])
        workers.run(redo, placement=Placement.TEXT)
        M, damaged = backend.get(workers.call(Placement.STATS, "solve_cfr", run.slugs, task_name="cfr-solve"))
        if damaged:
            raise ArtefactError(f"statistics of {damaged[:3]} are damaged again just after being written")
    workers.broadcast(Placement.GPU, "set_cfr", backend.put(M))


def train(run: EraseRun) -> None:
    log.info("train: %d concepts done before, %d to do", len(run.done_before), len(run.todo))
    streamed: list[Any] = []
    progress = {"done": len(run.done_before)}

    def finished(job: TrainConcepts, result: Any) -> None:
        progress["done"] += len(job.concepts)
        run.metrics.concepts_done(progress["done"], run.p.run_id)
        # Stream the finished concepts into the fusion sums while others train.
        slugs = [c.slug for c in job.concepts]
        streamed.append(run.workers.call(Placement.STATS, "add_concepts", slugs))
        log.info("train: %d/%d concepts done (%s)", progress["done"], len(run.concepts), job.label)

    jobs = [
        TrainConcepts(b, label=concept_label("train", b), on_done=finished) for b in run.batches(run.todo)
    ]
    run.workers.run(jobs, run.finished)
    for ref in streamed:
        run.backend.get(ref)


def _final_weights(run: EraseRun, method: str, arg: Any, task_name: str) -> None:
    """The weights ``write`` writes (``run.fused``): the statistics actor's ``method``, given
    ``arg`` and the original weights (from a GPU worker)."""
    backend, workers = run.backend, run.workers
    run.original = backend.put(workers.ask_one(OriginalWeights(label="original-weights"), Placement.GPU))
    weights, run.fusion_info = backend.get(
        workers.call(Placement.STATS, method, arg, run.original, task_name=task_name)
    )
    run.fused = backend.put(weights)


def fusion(run: EraseRun) -> None:
    """The method's result: W* for every projection, the fusion of the concepts' LoRAs (Eq. 7)."""
    _final_weights(run, "fuse", run.slugs, "fusion-solve")


def refined_weights(run: EraseRun) -> None:
    """A closed-form-only run's result: W' = W M for every projection (Eq. 2)."""
    _final_weights(run, "refined", len(run.concepts), "cfr-weights")


def write(run: EraseRun) -> None:
    p = run.p
    meta = {"base_model": p.request.model, "run_id": p.run_id, "model_fingerprint": p.model_fingerprint}

    def written(job: WriteFinal, result: dict[str, Any]) -> None:
        run.outputs.update(result["outputs"])
        # The source's files copied, its edited weights rewritten; a weight file that cannot
        # carry the edit (.bin, an EMA copy) left out, said here and in the report.
        run.pipeline_files = result["pipeline"]
        for rel, why in sorted(result["pipeline"]["left_out"].items()):
            log.warning("write: final/pipeline/%s left out: %s", rel, why)

    run.workers.run([WriteFinal(run.fused, meta, label="write-final", on_done=written)])


def erasure_report(run: EraseRun) -> None:
    """Per-concept residuals and attention mass, and the drift of other prompts, on the GPU
    workers (text encoder, projections, one UNet batch per concept and model)."""
    per_concept: dict[str, dict[str, Any]] = {}
    drift: dict[str, Any] = {}
    jobs: list[Job] = [
        ConceptReport(
            b, run.fused, label=concept_label("report", b), on_done=lambda j, r: per_concept.update(r)
        )
        for b in run.batches(run.concepts)
    ]
    retain = heldout_prompts(run.p.retain)
    jobs.append(DriftReport(run.fused, retain, label="drift-report", on_done=lambda j, r: drift.update(r)))
    run.workers.run(jobs)
    run.erasure = erasure_summary(per_concept, drift, run.p.request.max_residual)


def finish(run: EraseRun) -> None:
    """report.json, and the manifest marked complete with the checksum of every output."""
    p, storage, layout = run.p, run.storage, run.layout
    # The workers loaded the model when the run started; if its files changed since, the
    # result is not of the model the user now has: refuse it rather than call it complete.
    assert p.sources is not None  # prepare() sets it
    now = p.sources.fingerprint(p.request.model)
    expect_fingerprint(p.request.model, p.model_fingerprint, now)
    if run.spec.method == "mace":
        notes = artefacts.read_notes(storage, layout, [c.slug for c in run.concepts])
    else:  # a closed-form-only run trains nothing
        notes = {c.slug: {} for c in run.concepts}
    run.report = run_report(run, notes)
    if run.lock is not None:
        run.lock.check()  # the commit point: only the lease's holder marks the run complete
    report = json_bytes(run.report)
    storage.write_bytes(layout.report, report)
    # Every file the run hands out, the concepts' LoRAs and notes and the report too: a rerun
    # and `mace-ray pull` check them all.
    concepts = artefacts.concept_outputs(storage, layout, run.slugs) if run.spec.method == "mace" else {}
    run.manifest["outputs"] = {**run.outputs, **concepts, layout.report: artefacts.sha256(report)}
    run.manifest["status"] = "complete"
    write_json(storage, layout.manifest, run.manifest)
    log.info("erasure report: %s", summary_line(run.erasure))


# ------------------------------------------------------------------ what stages read and leave


def data_markers(run: EraseRun) -> list[str]:
    return [run.spec.data_layout(c).marker for c in run.todo]


def done_markers(run: EraseRun) -> list[str]:
    return [run.layout.done(slug) for slug in run.slugs]


def cfr_matrix(run: EraseRun) -> list[str]:
    return [run.layout.cfr_matrix]


def fusion_inputs(run: EraseRun) -> list[str]:
    return done_markers(run) + [run.layout.stats(slug) for slug in run.slugs] + cfr_matrix(run)


def final_files(run: EraseRun) -> list[str]:
    """The final files, and every file of final/pipeline/ the write reported."""
    return [run.layout.erasure, run.layout.cfr_erasure, *sorted(run.outputs)]


def trained(run: EraseRun) -> list[str]:
    """DONE of every concept, which vouches for its LoRA and notes (none: --method cfr)."""
    return done_markers(run) if run.spec.method == "mace" else []


ERASE_STAGES: tuple[Stage[EraseRun], ...] = (
    Stage(
        "text_statistics",
        Placement.TEXT,
        reads=given("concept list, prior captions, --retain set (checked by prepare)"),
        writes="concepts/<slug>/stats.safetensors, cache/prior/<key>.safetensors, cfr/domain, cfr/retain",
        marker=stored(
            "each of those files (one reused: with a matching sealed checksum)", text_statistics_files
        ),
        run=text_statistics,
        calls=(Placement.STATS,),
    ),
    Stage(
        "workers_start",
        Placement.GPU,
        reads=given("the model (fingerprint checked before and after loading), the masker"),
        writes="nothing",
        marker=state("a GPU worker with its models loaded (they load on every start)", "pool"),
        run=workers_start,
    ),
    Stage(
        "data",
        Placement.GPU,
        reads=state("the original model, on the started GPU workers", "pool"),
        writes="data/<key>/images/, masks/, data.json (shared by runs: key = model, concept, data settings)",
        marker=stored(
            "data.json of each concept to train, with the images' and masks' checksums",
            data_markers,
            scattered=True,  # data/ holds every run's images and masks: one request each
        ),
        run=data,
    ),
    Stage(
        "cfr",
        Placement.STATS,
        reads=stored(
            "every concept's statistics, prior, domain and retain statistics; "
            "the CFR solve text_statistics began",
            text_statistics_files,
            "cfr_solve",
        ),
        writes="cfr/M.safetensors (Eq. 2), M to every GPU worker",
        marker=stored("cfr/M.safetensors (solved again on a rerun: seconds)", cfr_matrix),
        run=cfr,
        calls=(Placement.GPU, Placement.TEXT),
    ),
    Stage(
        "train",
        Placement.GPU,
        reads=stored(
            "M (cfr/M.safetensors); images and masks where stored (a concept without them gets them first)",
            cfr_matrix,
        ),
        writes="concepts/<slug>/lora.safetensors, notes.json, DONE",
        marker=stored("DONE of every concept, with its LoRA's and notes' checksums", done_markers),
        run=train,
        calls=(Placement.STATS,),
    ),
    Stage(
        "fusion",
        Placement.STATS,
        reads=stored("every concept's DONE (its LoRA) and statistics, M", fusion_inputs),
        writes="nothing (the fused weights go to the next stage)",
        marker=state("the fused weights, in the run (solved again on a rerun: seconds)", "fused"),
        run=fusion,
        calls=(Placement.GPU,),
    ),
    Stage(
        "write",
        Placement.GPU,
        reads=state("the fused weights, the model's folder", "fused"),
        writes="final/pipeline/, final/erasure.safetensors, final/cfr.safetensors",
        marker=stored(
            "each of those files (the manifest records their checksums once complete)", final_files
        ),
        run=write,
    ),
    Stage(
        "erasure_report",
        Placement.GPU,
        reads=stored(
            "the fused weights, every concept's LoRA (its DONE); images and masks where stored",
            trained,
            "fused",
        ),
        writes="nothing (the figures go into report.json)",
        marker=state("the figures, in the run (computed again on a rerun)", "erasure"),
        run=erasure_report,
    ),
    Stage(
        "finish",
        Placement.DRIVER,
        reads=stored("every concept's notes (its DONE), the erasure figures", trained, "erasure"),
        writes="report.json, manifest.json (status complete, output checksums)",
        marker=stored(
            "report.json, manifest.json; a rerun checks that every output matches its checksum",
            lambda run: [run.layout.report, run.layout.manifest],
        ),
        run=finish,
    ),
)


BY_NAME = {s.name: s for s in ERASE_STAGES}
# A closed-form-only run (--method cfr): no images, masks or LoRAs; its result is W' itself.
CFR_STAGES: tuple[Stage[EraseRun], ...] = (
    BY_NAME["text_statistics"],
    BY_NAME["workers_start"],
    BY_NAME["cfr"],
    Stage(
        "refined_weights",
        Placement.STATS,
        reads=stored("M", cfr_matrix),
        writes="nothing (W' goes to the next stage)",
        marker=state("W', in the run (seconds)", "fused"),
        run=refined_weights,
        calls=(Placement.GPU,),
    ),
    BY_NAME["write"],
    BY_NAME["erasure_report"],
    BY_NAME["finish"],
)
