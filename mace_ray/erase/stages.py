"""The stages of an erase run (after ``prepare``), as data, and the state they share.

``ERASE_STAGES`` is the run: each ``Stage`` says where it runs and what it reads and
writes, and its function plans typed jobs (``mace_ray.engine.jobs``) for a pool of workers. The
statistics actor starts solving CFR as soon as the text statistics are in, so images and
masks (which need only the original model) never wait for the closed form.
"""

from __future__ import annotations

import logging
from typing import Any

from mace_core.concepts import Concept
from mace_core.erasure_report import summarize as erasure_summary
from mace_core.erasure_report import summary_line
from mace_core.errors import ArtefactError, SettingError
from mace_core.fingerprint import expect_fingerprint
from mace_core.prompts import heldout_prompts
from mace_ray.engine.jobs import Job, concept_label
from mace_ray.engine.pool import worker_shape
from mace_ray.engine.stages import Placement, Stage
from mace_ray.erase import artefacts
from mace_ray.erase.concept_worker import ConceptWorker
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
from mace_ray.storage.base import write_json
from mace_ray.storage.model_cache import fingerprint_model

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
    run.run_text_jobs(jobs + text_stats_jobs(missing))
    log.info(
        "text_statistics: %d concepts computed, %d reused", len(missing), len(run.concepts) - len(missing)
    )
    # The statistics actor solves CFR while the GPU workers start and make images and masks.
    run.cfr_solve = run.backend.call(run.stats, "solve_cfr", run.slugs, task_name="cfr-solve")


def workers_start(run: EraseRun) -> None:
    """Start the GPU workers and wait until a first one has loaded its models."""
    req = run.p.request
    n, resources = worker_shape(
        run.backend, req.workers, req.gpus_per_worker, max(1, len(run.batches(run.todo)))
    )
    log.info("workers: %d x %s (%s executor)", n, resources, run.backend.name)
    # Autoscaling clusters grow to what the GPU stages can use, and shrink after.
    run.backend.request_resources([resources.bundle()] * n)
    run.pool = run._pool(ConceptWorker, resources, n, "mace-worker")
    run.pool.wait_started()
    if run.todo and req.concepts_per_batch is None:
        # Concepts per batch from what a worker's free memory holds, capped so that the
        # concepts spread over every worker of the pool.
        plan = run.pool.ask_one(BatchPlan(label="batch-plan"))
        run.batch_size = max(1, min(plan["concepts_per_batch"], -(-len(run.todo) // run.pool.size)))
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
    ready = artefacts.existing(run.storage, list(where.values()))
    need = [c for c in run.todo if where[c.slug] not in ready]
    jobs = [PrepareData(b, label=concept_label("data", b)) for b in run.batches(need)]
    run.gpu_pool().run(jobs, run.finished)
    run.data_made, run.data_reused = len(need), len(run.todo) - len(need)
    log.info("data: images and masks of %d concepts made, %d reused", run.data_made, run.data_reused)


def cfr(run: EraseRun) -> None:
    backend = run.backend
    M, damaged = backend.get(run.cfr_solve)
    if damaged:
        # Checked where they are read (the statistics actor reads them all anyway): damaged
        # statistics are computed again, never trusted and never fatal.
        log.warning("statistics of %d concepts are damaged; computing them again", len(damaged))
        for slug in damaged:
            run.storage.delete_prefix(run.layout.stats(slug))
        run.run_text_jobs(text_stats_jobs([c for c in run.concepts if c.slug in set(damaged)]))
        M, damaged = backend.get(backend.call(run.stats, "solve_cfr", run.slugs, task_name="cfr-solve"))
        if damaged:
            raise ArtefactError(f"statistics of {damaged[:3]} are damaged again just after being written")
    run.gpu_pool().broadcast("set_cfr", backend.put(M))


def train(run: EraseRun) -> None:
    log.info("train: %d concepts done before, %d to do", len(run.done_before), len(run.todo))
    streamed: list[Any] = []
    progress = {"done": len(run.done_before)}

    def finished(job: TrainConcepts, result: Any) -> None:
        progress["done"] += len(job.concepts)
        run.metrics.concepts_done(progress["done"], run.p.run_id)
        # Stream the finished concepts into the fusion sums while others train.
        slugs = [c.slug for c in job.concepts]
        streamed.append(run.backend.call(run.stats, "add_concepts", slugs))
        log.info("train: %d/%d concepts done (%s)", progress["done"], len(run.concepts), job.label)

    jobs = [
        TrainConcepts(b, label=concept_label("train", b), on_done=finished) for b in run.batches(run.todo)
    ]
    run.gpu_pool().run(jobs, run.finished)
    for ref in streamed:
        run.backend.get(ref)


def fusion(run: EraseRun) -> None:
    backend = run.backend
    run.original = backend.put(run.gpu_pool().ask_one(OriginalWeights(label="original-weights")))
    fused, run.fusion_info = backend.get(
        backend.call(run.stats, "fuse", run.slugs, run.original, task_name="fusion-solve")
    )
    run.fused = backend.put(fused)


def refined_weights(run: EraseRun) -> None:
    """A closed-form-only run's result: W' = W M for every projection (Eq. 2)."""
    backend = run.backend
    run.original = backend.put(run.gpu_pool().ask_one(OriginalWeights(label="original-weights")))
    refined, run.fusion_info = backend.get(
        backend.call(run.stats, "refined", len(run.concepts), run.original, task_name="cfr-weights")
    )
    run.fused = backend.put(refined)


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

    run.gpu_pool().run([WriteFinal(run.fused, meta, label="write-final", on_done=written)])


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
    run.gpu_pool().run(jobs)
    run.erasure = erasure_summary(per_concept, drift, run.p.request.max_residual)


def finish(run: EraseRun) -> None:
    """report.json, and the manifest marked complete with the checksum of every output."""
    p, storage, layout = run.p, run.storage, run.layout
    # The workers loaded the model when the run started; if its files changed since, the
    # result is not of the model the user now has: refuse it rather than call it complete.
    expect_fingerprint(
        p.request.model, p.model_fingerprint, fingerprint_model(p.request.model, p.request.s3_endpoint)
    )
    if run.spec.method == "mace":
        notes = {c.slug: artefacts.read_notes(storage, layout, c.slug) for c in run.concepts}
    else:  # a closed-form-only run trains nothing
        notes = {c.slug: {} for c in run.concepts}
    run.report = run_report(run, notes)
    if run.lock is not None:
        run.lock.check()  # the commit point: only the lease's holder marks the run complete
    write_json(storage, layout.report, run.report)
    # Every file the run hands out, the concepts' LoRAs and notes too: a rerun checks them all.
    concepts = artefacts.concept_outputs(storage, layout, run.slugs) if run.spec.method == "mace" else {}
    run.manifest["outputs"] = {**run.outputs, **concepts}
    run.manifest["status"] = "complete"
    write_json(storage, layout.manifest, run.manifest)
    log.info("erasure report: %s", summary_line(run.erasure))


ERASE_STAGES: tuple[Stage[EraseRun], ...] = (
    Stage(
        "text_statistics",
        Placement.TEXT,
        reads="concept list, prior captions, --retain set",
        writes="concepts/<slug>/stats.safetensors, cache/prior/<key>.safetensors, cfr/domain, cfr/retain",
        marker="each file present with a matching sealed checksum",
        run=text_statistics,
    ),
    Stage(
        "workers_start",
        Placement.GPU,
        reads="the model (fingerprint checked before and after loading), the masker",
        writes="nothing",
        marker="none (models load on every start)",
        run=workers_start,
    ),
    Stage(
        "data",
        Placement.GPU,
        reads="the original model",
        writes="data/<key>/images/, masks/, data.json (shared by runs: key = model, concept, data settings)",
        marker="data.json with the images' and masks' checksums",
        run=data,
    ),
    Stage(
        "cfr",
        Placement.STATS,
        reads="every concept's statistics, prior, domain and retain statistics",
        writes="cfr/M.safetensors (Eq. 2)",
        marker="none (solved again: seconds)",
        run=cfr,
    ),
    Stage(
        "train",
        Placement.GPU,
        reads="images, masks, M",
        writes="concepts/<slug>/lora.safetensors, notes.json, DONE",
        marker="DONE with the LoRA's and notes' checksums",
        run=train,
    ),
    Stage(
        "fusion",
        Placement.STATS,
        reads="every LoRA and fusion statistic, M",
        writes="nothing (the fused weights go to the next stage)",
        marker="none (solved again: seconds)",
        run=fusion,
    ),
    Stage(
        "write",
        Placement.GPU,
        reads="the fused weights",
        writes="final/pipeline/, final/erasure.safetensors, final/cfr.safetensors",
        marker="the manifest's output checksums (once complete)",
        run=write,
    ),
    Stage(
        "erasure_report",
        Placement.GPU,
        reads="the fused weights, images, masks, LoRAs",
        writes="nothing (the figures go into report.json)",
        marker="report.json",
        run=erasure_report,
    ),
    Stage(
        "finish",
        Placement.DRIVER,
        reads="notes of every concept",
        writes="report.json, manifest.json (status complete, output checksums)",
        marker="manifest.json status complete and every output matching its checksum",
        run=finish,
    ),
)


_BY_NAME = {s.name: s for s in ERASE_STAGES}
# A closed-form-only run (--method cfr): no images, masks or LoRAs; its result is W' itself.
CFR_STAGES: tuple[Stage[EraseRun], ...] = (
    _BY_NAME["text_statistics"],
    _BY_NAME["workers_start"],
    _BY_NAME["cfr"],
    Stage(
        "refined_weights",
        Placement.STATS,
        reads="M, the original weights",
        writes="nothing (W' goes to the next stage)",
        marker="none (seconds)",
        run=refined_weights,
    ),
    _BY_NAME["write"],
    _BY_NAME["erasure_report"],
    _BY_NAME["finish"],
)
# What a stage needs done before it in the same driver (a partial run adds it).
NEEDS: dict[str, tuple[str, ...]] = {
    "text_statistics": (),
    "workers_start": (),
    "data": ("workers_start",),
    "cfr": ("text_statistics", "workers_start"),
    "train": ("cfr",),
    "fusion": ("train",),
    "write": ("fusion",),
    "erasure_report": ("write",),
    "finish": ("erasure_report",),
}
CFR_ONLY = "cfr"


def plan_stages(spec: str, method: str = "mace") -> tuple[str, tuple[Stage[EraseRun], ...]]:
    """``--stages`` of ``--method``: (method, stages to run). ``--method cfr``: closed-form
    refinement only (a different result, so a different run), whole. ``--stages all``: the
    method; else stage names of a MACE run, comma-separated, with what they need: a partial run
    whose artefacts the full run reuses. ``--stages cfr`` alone is the old spelling of
    ``--method cfr``: it still means that, with a warning."""
    text = spec.strip().lower()
    if text == CFR_ONLY:
        log.warning(
            "--stages cfr is deprecated: use --method cfr (for a MACE run stopped after its cfr "
            "stage, name another stage with it: --stages text_statistics,cfr)"
        )
        text, method = "all", CFR_ONLY
    if method == CFR_ONLY:
        if text not in ("", "all"):
            raise SettingError(f"--stages {spec}: --method cfr runs whole; partial runs are of --method mace")
        return CFR_ONLY, CFR_STAGES
    if text in ("", "all"):
        return "mace", ERASE_STAGES
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in _BY_NAME]
    if unknown:
        valid = ", ".join(["all", *_BY_NAME])
        raise SettingError(f"--stages: unknown stage {unknown[0]!r} (valid: {valid})")
    wanted: set[str] = set()

    def add(name: str) -> None:
        if name not in wanted:
            wanted.add(name)
            for need in NEEDS[name]:
                add(need)

    for name in names:
        add(name)
    return "mace", tuple(s for s in ERASE_STAGES if s.name in wanted)


def needs_masker(method: str, stages: tuple[Stage[EraseRun], ...]) -> bool:
    """Whether a run's GPU workers load a masker (at start, so that their batch plan counts its
    memory): those of a MACE run do; a closed-form-only run makes no masks and loads none, and
    a partial run without GPU stages (``--stages text_statistics``) starts no worker."""
    return method == "mace" and any(s.name == "workers_start" for s in stages)
