"""The erase job: concept list in, erased pipeline out, in the run layout of ``mace_ray.layout``.

Stages (each resumable from storage):
  1. prepare: parse and validate the concept list, fingerprint the model (every file that
     counts, ``mace_core.fingerprint``), derive the run id
  2. text statistics per concept, prior (cached) and retained-set statistics
  3. CFR: the statistics worker sums X_k, C_k and solves M; concept workers set W' = W M
  4. concept batches: images, masks, LoRA (DONE marker last), streamed into the fusion sums
  5. fusion: the statistics worker solves W*; a concept worker writes the model
The same driver runs in this process (LocalBackend) or on a Ray cluster (RayBackend).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

import mace_core
from mace_core.closed_form_weights import domain_phrase, profile_type
from mace_core.concepts import Concept, ConceptList, ConceptType, read_concept_file
from mace_core.erasure_report import headline, summary_line
from mace_core.erasure_report import summarize as erasure_summary
from mace_core.errors import ArtefactError, ConceptError, MaceError, quoted
from mace_core.fingerprint import ModelFingerprint, expect_fingerprint
from mace_core.masking import check_masker_sources
from mace_core.models import DEFAULT_MODEL, TINY_MODEL, load_text_components, pick_device
from mace_core.prompts import domain_prompts, generation_prompt, heldout_pairs, heldout_prompts, prompt_pairs
from mace_core.settings import EraseSettings
from mace_core.text_stats import (
    TextEncoder,
    default_captions_path,
    prior_cache_key,
    read_captions,
    second_moment_from_bytes,
)
from mace_ray import artefacts
from mace_ray.backend import LocalBackend, RayBackend
from mace_ray.layout import RunLayout, prior_cache_path
from mace_ray.metrics import make_metrics
from mace_ray.models_remote import TEXT_COMPONENTS, fingerprint_model, resolve_model
from mace_ray.pool import Job, WorkerPool, worker_shape
from mace_ray.preflight import check_placeable, preflight_storage
from mace_ray.resources import Resources
from mace_ray.runlock import RunLock
from mace_ray.storage import Storage, open_storage, read_json, write_json
from mace_ray.workers import RunSpec, StatsWorker

log = logging.getLogger("mace_ray")

EXECUTORS = ("ray", "local")


@dataclass(frozen=True)
class EraseRequest:
    concept_file: str
    model: str = DEFAULT_MODEL
    output: str = "mace-runs"
    default_type: ConceptType = ConceptType.OBJECT
    settings: EraseSettings = field(default_factory=EraseSettings)
    prior_captions: str | None = None
    retain_file: str | None = None
    device: str | None = None
    concepts_per_batch: int | None = None  # None: from the workers' free GPU memory
    s3_endpoint: str | None = None
    executor: str = "ray"
    address: str | None = None  # Ray cluster; None: RAY_ADDRESS, else a local Ray
    workers: int | None = None  # None: one per GPU (gpus_per_worker each), else 1
    gpus_per_worker: float | None = None  # None: 1 if the cluster has GPUs, else 0
    resume: bool = True
    # A concept whose residual (erasure report) stays above this fails the command after
    # everything is written; not part of the run id (it changes no result).
    max_residual: float | None = None
    # A second driver on the same run waits this long for the first to finish (or for its
    # lease to expire) before it refuses; not part of the run id.
    lock_wait_s: float = 90.0
    # How long a cluster with an autoscaler may take to add a node the workers fit on.
    placement_wait_s: float = 600.0
    progress: bool = True  # progress bars and lines inside the stages (the CLI's --quiet: off)

    def __post_init__(self) -> None:
        if self.max_residual is not None and not self.max_residual >= 0:
            raise ValueError(f"max_residual must be >= 0, got {self.max_residual}")
        if self.executor not in EXECUTORS:
            raise ValueError(f"unknown executor {self.executor!r} (valid: {', '.join(EXECUTORS)})")
        if self.concepts_per_batch is not None and self.concepts_per_batch < 1:
            raise ValueError(f"concepts_per_batch must be >= 1, got {self.concepts_per_batch}")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if not self.lock_wait_s >= 0:
            raise ValueError(f"lock_wait_s must be >= 0, got {self.lock_wait_s}")


@dataclass
class Prepared:
    """Validated inputs: what every later stage needs."""

    request: EraseRequest
    concepts: ConceptList
    retain: list[Concept]
    captions: list[str]
    fingerprint: ModelFingerprint
    prior_key: str
    run_id: str
    profile: ConceptType  # whose paper configuration sets the closed-form weights

    @property
    def model_fingerprint(self) -> str:
        return self.fingerprint.full

    def domain_prompts(self) -> list[str]:
        """Prompts of the domain set C_d: the profile's domain phrase in its templates."""
        phrase = domain_phrase(self.profile)
        n = self.request.settings.prompts_per_concept
        return domain_prompts([phrase], self.profile, n) if phrase else []

    def retain_prompts(self) -> list[str]:
        """Prompts of the retained set C_r: each --retain concept in its type's templates."""
        n = self.request.settings.prompts_per_concept
        return [p for c in self.retain for p in domain_prompts([c.text], c.type, n)]


class Timer:
    """Seconds per stage, logged as progress lines of the job log (and sent to metrics)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.on_stage: Callable[[str, float], None] | None = None
        self.on_start: Callable[[str], None] | None = None  # e.g. the run lock's check

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self.on_start is not None:
            self.on_start(name)
        t = time.perf_counter()
        log.info("stage %s: started", name)
        yield
        dt = time.perf_counter() - t
        self.seconds[name] = round(self.seconds.get(name, 0.0) + dt, 3)
        log.info("stage %s: done in %.1fs", name, dt)
        if self.on_stage is not None:
            self.on_stage(name, dt)


def versions() -> dict[str, str]:
    import diffusers
    import transformers

    out = {
        "mace-ray": mace_core.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }
    try:
        import ray

        out["ray"] = ray.__version__
    except ImportError:
        pass
    return out


def validate_prompts(
    encoder: TextEncoder, concepts: list[Concept], n_prompts: int | None, source: str
) -> None:
    """Every prompt of every concept must fit the text encoder; errors name the concept."""
    for c in concepts:
        for pair in prompt_pairs(c, n_prompts) + heldout_pairs(c):
            encoder.check_length(pair.concept, f"{source}: concept {quoted(c.text)}")
            encoder.check_length(
                pair.anchor, f"{source}: anchor {quoted(c.anchor)} of concept {quoted(c.text)}"
            )
        encoder.check_length(generation_prompt(c), f"{source}: concept {quoted(c.text)}")


def compute_run_id(
    model: str,
    fingerprint: str,
    concepts: list[Concept],
    retain: list[Concept],
    prior_key: str,
    settings: EraseSettings,
) -> str:
    """Same model, concepts and settings -> same run id -> resume instead of redo.

    Batching, executor and worker counts are not part of it: they do not change the result.
    """
    spec = {
        "model": model,
        "fingerprint": fingerprint,
        "concepts": [c.to_dict() for c in concepts],
        "retain": [c.to_dict() for c in retain],
        "prior": prior_key,
        "settings": settings.to_dict(),
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def prepare(req: EraseRequest) -> Prepared:
    """Stage 1, on the driver. Everything that can be wrong with the inputs fails here,
    before anything is written; only the tokenizer and text encoder are loaded."""
    concepts = read_concept_file(req.concept_file, req.default_type)
    retain: list[Concept] = []
    if req.retain_file:
        retain = read_concept_file(req.retain_file, req.default_type).concepts
        clash = {c.key for c in retain} & {c.key for c in concepts.concepts}
        if clash:
            raise ConceptError(f"{req.retain_file}: concepts both erased and retained: {sorted(clash)[:5]}")
    captions = read_captions(req.prior_captions or default_captions_path())
    check_masker_sources(req.settings.masks, tiny=req.model == TINY_MODEL)
    # An s3:// model is fetched (text components only) into the local model cache.
    tokenizer, text_encoder = load_text_components(resolve_model(req.model, req.s3_endpoint, TEXT_COMPONENTS))
    encoder = TextEncoder(tokenizer, text_encoder, torch.device("cpu"))
    n = req.settings.prompts_per_concept
    validate_prompts(encoder, concepts.concepts, n, concepts.source)
    validate_prompts(encoder, retain, n, req.retain_file or "")
    # Every file of the model that can change the result: a model changed in place is a new run.
    fingerprint = fingerprint_model(req.model, req.s3_endpoint)
    prior_key = prior_cache_key(fingerprint.text, captions)
    run_id = compute_run_id(req.model, fingerprint.full, concepts.concepts, retain, prior_key, req.settings)
    profile = profile_type(c.type for c in concepts.concepts)
    return Prepared(req, concepts, retain, captions, fingerprint, prior_key, run_id, profile)


def earlier_run(storage: Storage, layout: RunLayout, p: Prepared) -> dict[str, Any] | None:
    """The manifest of an earlier driver of this run, if any (nothing is written). A complete
    run whose outputs no longer match their checksums comes back as not complete."""
    if not storage.exists(layout.manifest):
        return None
    manifest = read_json(storage, layout.manifest)
    if manifest.get("status") == "complete":
        problem = check_outputs(storage, layout, manifest)
        if problem is not None:
            log.warning("run %s was complete, but %s: its final stages run again", p.run_id, problem)
            manifest["status"] = "damaged"
    return manifest


def open_run(
    storage: Storage, layout: RunLayout, p: Prepared, earlier: dict[str, Any] | None
) -> dict[str, Any]:
    """Write the manifest of a new run, or take up an earlier driver's (resume)."""
    if earlier is not None:
        manifest = earlier
        manifest["resumed"] = manifest.get("resumed", 0) + 1
    else:
        manifest = {
            "run_id": p.run_id,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "model": p.request.model,
            "model_fingerprint": p.model_fingerprint,
            "model_components": p.fingerprint.components,
            "concepts": [c.to_dict() for c in p.concepts.concepts],
            "retain": [c.to_dict() for c in p.retain],
            "duplicates": p.concepts.duplicates,
            "prior_captions": p.request.prior_captions or "builtin",
            "settings": p.request.settings.to_dict(),
            "versions": versions(),
            "resumed": 0,
        }
    manifest["status"] = "running"
    manifest.pop("error", None)
    write_json(storage, layout.manifest, manifest)
    return manifest


def check_outputs(storage: Storage, layout: RunLayout, manifest: dict[str, Any]) -> str | None:
    """Why a complete run's outputs cannot be returned as they are (a file missing or not
    matching the checksum recorded when it was written), or None when they all hold."""
    sums = manifest.get("outputs")
    if not isinstance(sums, dict) or not sums:
        return "it records no checksums of its outputs"
    try:
        read_json(storage, layout.report)
    except MaceError as e:
        return f"its report is unreadable ({str(e)[:120]})"
    for key, digest in sorted(sums.items()):
        if not storage.exists(key):
            return f"{key} is missing"
        if artefacts.stored_sha256(storage, key) != digest:
            return f"{key} does not match its checksum"
    return None


@contextmanager
def backend_for(executor: str, address: str | None = None) -> Iterator[LocalBackend | RayBackend]:
    """The executor's backend; a local Ray is started (and stopped) when no cluster is named."""
    if executor == "local":
        yield LocalBackend()
        return
    import ray

    started = False
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            # address="local" ignores stale cluster files of earlier `ray start`s.
            ray.init(address="local", log_to_driver=True)
        started = True
    try:
        yield RayBackend()
    finally:
        if started:
            ray.shutdown()


# The run lock's lease: renewed every LOCK_HEARTBEAT_S, stale after LOCK_TTL_S without renewal
# (a driver killed on another host blocks its run that long; on the same host, not at all).
LOCK_TTL_S, LOCK_HEARTBEAT_S = 60.0, 15.0


def run_erase(req: EraseRequest) -> dict[str, Any]:
    """Run (or resume) an erase; returns the report. Raises MaceError on bad input."""
    timer = Timer()
    # Storage and device first, in seconds: a bad output (an unreachable or read-only S3
    # bucket too) or device is reported before any model is loaded, and nothing is created.
    preflight_storage(req.output, req.s3_endpoint)
    storage = open_storage(req.output, s3_endpoint=req.s3_endpoint)
    if req.device is not None:
        pick_device(req.device)
    with timer.stage("prepare"):
        p = prepare(req)
    layout = RunLayout(p.run_id)
    # One driver per run: a second one waits for the first (then finds the run complete),
    # or refuses in one line naming it. The lease lives outside the run's folder, which
    # --no-resume deletes.
    lock = RunLock(storage, layout.lock, ttl_s=LOCK_TTL_S, heartbeat_s=LOCK_HEARTBEAT_S)
    lock.acquire(wait_s=req.lock_wait_s)
    timer.on_start = lambda stage: lock.check()
    try:
        return _run_locked(req, p, storage, layout, timer, lock)
    finally:
        lock.release()


def _run_locked(
    req: EraseRequest, p: Prepared, storage: Storage, layout: RunLayout, timer: Timer, lock: RunLock
) -> dict[str, Any]:
    if not req.resume and storage.exists(layout.manifest):
        log.info("--no-resume: deleting the earlier state of run %s", p.run_id)
        storage.delete_prefix(layout.root)
    earlier = earlier_run(storage, layout, p)
    if earlier is not None and earlier["status"] == "complete":
        log.info("run %s is already complete (its outputs match their checksums); nothing to do", p.run_id)
        return read_json(storage, layout.report)
    # SIGTERM handled again inside: ray.init installs its own failure handler for it.
    with backend_for(req.executor, req.address) as backend, on_sigterm():
        # Before anything is written: a worker shape that no node can hold fails in one line
        # (after a bounded wait when an autoscaler may add one) instead of pending forever.
        _, resources = worker_shape(backend, req.workers, req.gpus_per_worker, 1)
        what = f"--gpus-per-worker {req.gpus_per_worker:g}" if req.gpus_per_worker else None
        check_placeable(backend, resources, 1, req.placement_wait_s, what=what)
        manifest = open_run(storage, layout, p, earlier)
        log.info(
            "run %s at %s/%s (%d concepts, model fingerprint %s)",
            p.run_id,
            storage.url,
            layout.root,
            len(p.concepts.concepts),
            p.model_fingerprint,
        )
        for d in p.concepts.duplicates:
            log.warning(
                "%s:%s duplicate of line %s dropped: %s",
                p.concepts.source,
                d["line"],
                d["first_line"],
                d["text"],
            )
        try:
            return Driver(backend, p, storage, layout, timer, manifest, lock).run()
        except BaseException as e:
            # Stopped from outside (SIGTERM on preemption, Ctrl-C): nothing went wrong and
            # the rerun resumes, so say so rather than "failed".
            stop = stopped_by(e)
            manifest["status"] = "interrupted" if stop else "failed"
            manifest["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500]
            if not lock.lost:  # a driver that lost its lease must not write over the new holder's run
                write_json(storage, layout.manifest, manifest)
            if isinstance(stop, Interrupted) and stop is not e:
                raise stop from None  # surfaced through C code (Ray's wait) as a SystemError
            raise


def stopped_by(e: BaseException) -> BaseException | None:
    """The Interrupted or KeyboardInterrupt behind ``e``, if any. A signal handler that
    raises while Ray's Cython code runs comes back as a SystemError caused by it."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, (Interrupted, KeyboardInterrupt)):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


class Interrupted(BaseException):
    """The driver received SIGTERM (``on_sigterm``): stop, mark the run, let the rerun resume.

    A BaseException, like KeyboardInterrupt, so that no ``except Exception`` swallows it.
    """


@contextmanager
def on_sigterm() -> Iterator[None]:
    """Turn SIGTERM (cluster preemption, ``ray job stop``, ``kill``) into ``Interrupted`` in
    the main thread while the block runs, so the run stops cleanly: workers and a local Ray
    are shut down by the context managers it unwinds through."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Interrupted(f"signal {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class Driver:
    """Stages 2-5 over a pool of concept workers and one statistics worker."""

    def __init__(
        self,
        backend: LocalBackend | RayBackend,
        p: Prepared,
        storage: Storage,
        layout: RunLayout,
        timer: Timer,
        manifest: dict[str, Any],
        lock: RunLock | None = None,
    ) -> None:
        self.backend = backend
        self.lock = lock
        self.p = p
        self.storage = storage
        self.layout = layout
        self.timer = timer
        self.manifest = manifest
        req = p.request
        self.spec = RunSpec(
            run_id=p.run_id,
            model=req.model,
            output=req.output,
            settings=req.settings,
            prior_key=p.prior_key,
            model_fingerprint=p.model_fingerprint,
            profile=p.profile,
            s3_endpoint=req.s3_endpoint,
            device=req.device,
            metrics=backend.name,
            progress=req.progress,
        )
        self.concepts = p.concepts.concepts
        # Actor names must be unique in the cluster: a killed driver's actors may linger a moment.
        self.session = f"{p.run_id[:8]}-{uuid.uuid4().hex[:6]}"
        self.metrics = metrics = make_metrics(backend.name)
        timer.on_stage = lambda stage, seconds: metrics.stage_seconds(stage, seconds, p.run_id)

    def worker_shape(self, n_batches: int) -> tuple[int, Resources]:
        req = self.p.request
        return worker_shape(self.backend, req.workers, req.gpus_per_worker, n_batches)

    def batch_size(self, pool: WorkerPool, n_concepts: int) -> int:
        """Concepts per worker batch: as requested, else what a worker's free memory holds,
        capped so that ``n_concepts`` spread over every worker of the pool."""
        if self.p.request.concepts_per_batch is not None:
            return self.p.request.concepts_per_batch
        plan = pool.ask_one("batch_plan")
        k = max(1, min(plan["concepts_per_batch"], -(-n_concepts // pool.size)))
        log.info("concepts per batch: %d (auto; one worker's memory holds %d)", k, plan["concepts_per_batch"])
        return k

    def run(self) -> dict[str, Any]:
        backend, storage, layout = self.backend, self.storage, self.layout
        # With an automatic batch size, size the pool as if every concept were a batch: the
        # batch size is then capped so that every worker gets work (batch_size).
        bs = self.p.request.concepts_per_batch or 1
        # A concept is reused only if its LoRA and notes match the checksums of its marker.
        done_before = artefacts.verified_done(storage, layout)
        todo = [c for c in self.concepts if c.slug not in done_before]
        n_workers, resources = self.worker_shape(max(1, -(-len(todo) // bs)))
        log.info("workers: %d x %s (%s executor)", n_workers, resources, backend.name)
        # Autoscaling clusters grow to what the GPU stages can use, and shrink after.
        backend.request_resources([resources.bundle()] * n_workers)
        stats = backend.spawn(
            StatsWorker, (self.spec,), Resources(cpus=0), f"mace-stats-{self.session}", True
        )
        self.metrics.run_started(self.p.run_id, len(self.concepts), len(done_before))
        pool = WorkerPool(backend, self.spec, resources, n_workers, storage, self.session)
        try:
            with self.timer.stage("workers_start"):  # model loading, until a first worker is ready
                pool.wait_started()
            report = self._stages(pool, stats, todo, done_before)
        finally:
            pool.shutdown()
            backend.kill(stats)
            backend.request_resources([])
        return report

    def _stages(
        self, pool: WorkerPool, stats: Any, todo: list[Concept], done_before: set[str]
    ) -> dict[str, Any]:
        backend, storage, layout, timer, p = self.backend, self.storage, self.layout, self.timer, self.p
        slugs = [c.slug for c in self.concepts]
        with timer.stage("text_statistics"):
            jobs = []
            prior_key = prior_cache_path(p.prior_key)
            prior_cached = self._reusable_stats(prior_key)
            if not prior_cached:
                jobs.append(Job("prior_stats", (p.captions,), "prior"))
            for key, prompts, label in (
                (layout.domain_stats, p.domain_prompts(), "domain-set"),
                (layout.retain_stats, p.retain_prompts(), "retained-set"),
            ):
                if prompts and not self._reusable_stats(key):
                    jobs.append(Job("prompt_stats", (key, prompts), label))
            have = artefacts.slugs_with(storage, layout, "stats.safetensors")
            missing = [c for c in self.concepts if c.slug not in have]
            pool.run(jobs + self._text_stats_jobs(missing))
            log.info(
                "text_statistics: %d concepts computed, %d reused",
                len(missing),
                len(self.concepts) - len(missing),
            )

        # The statistics actor solves CFR while the workers make images and masks, which
        # need only the original model: data generation never waits for the closed form.
        cfr = backend.call(stats, "solve_cfr", slugs, task_name="cfr-solve")
        bs = self.batch_size(pool, len(todo)) if todo else 1
        with timer.stage("data"):
            ready = artefacts.slugs_with(storage, layout, "data.json")
            need = [c for c in todo if c.slug not in ready]
            batches = [need[i : i + bs] for i in range(0, len(need), bs)]
            pool.run(
                [Job("prepare_data", (b,), f"data[{b[0].slug}+{len(b) - 1}]", concepts=b) for b in batches]
            )
            log.info(
                "data: images and masks of %d concepts made, %d reused", len(need), len(todo) - len(need)
            )

        with timer.stage("cfr"):
            M, damaged = backend.get(cfr)
            if damaged:
                # Checked where they are read (the statistics actor reads them all anyway):
                # damaged statistics are computed again, never trusted and never fatal.
                log.warning("statistics of %d concepts are damaged; computing them again", len(damaged))
                for slug in damaged:
                    storage.delete_prefix(layout.stats(slug))
                pool.run(self._text_stats_jobs([c for c in self.concepts if c.slug in set(damaged)]))
                M, damaged = backend.get(backend.call(stats, "solve_cfr", slugs, task_name="cfr-solve"))
                if damaged:
                    raise ArtefactError(
                        f"statistics of {damaged[:3]} are damaged again just after being written"
                    )
            pool.broadcast("set_cfr", backend.put(M))

        with timer.stage("train"):
            log.info("train: %d concepts done before, %d to do", len(done_before), len(todo))
            streamed: list[Any] = []
            progress = {"done": len(done_before)}

            def finished(job: Job, result: list[str]) -> None:
                progress["done"] += len(job.args[0])
                self.metrics.concepts_done(progress["done"], self.p.run_id)
                # Stream the finished concepts into the fusion sums while others train.
                streamed.append(backend.call(stats, "add_concepts", [c.slug for c in job.args[0]]))
                log.info("train: %d/%d concepts done (%s)", progress["done"], len(self.concepts), job.label)

            batches = [todo[i : i + bs] for i in range(0, len(todo), bs)]
            pool.run(
                [
                    Job("process", (b,), f"concepts[{b[0].slug}+{len(b) - 1}]", finished, concepts=b)
                    for b in batches
                ]
            )
            for ref in streamed:
                backend.get(ref)

        with timer.stage("fusion"):
            original = pool.call_one("original_weights")
            fused, info = backend.get(backend.call(stats, "fuse", slugs, original, task_name="fusion-solve"))

        fused_ref = backend.put(fused)
        with timer.stage("write"):
            meta = {
                "base_model": p.request.model,
                "run_id": p.run_id,
                "model_fingerprint": p.model_fingerprint,
            }
            outputs: dict[str, str] = {}
            pool.run([Job("write_final", (fused_ref, meta), "write-final", lambda j, r: outputs.update(r))])

        with timer.stage("erasure_report"):
            erasure = self._erasure_report(pool, fused_ref, bs)

        # The workers loaded the model when the run started; if its files changed since, the
        # result is not of the model the user now has: refuse it rather than call it complete.
        expect_fingerprint(
            p.request.model, p.model_fingerprint, fingerprint_model(p.request.model, p.request.s3_endpoint)
        )
        notes = {c.slug: artefacts.read_notes(storage, layout, c.slug) for c in self.concepts}
        report = self._report(notes, info, prior_cached, pool, erasure)
        if self.lock is not None:
            self.lock.check()  # the commit point: only the lease's holder marks the run complete
        write_json(storage, layout.report, report)
        self.manifest["outputs"] = outputs
        self.manifest["status"] = "complete"
        write_json(storage, layout.manifest, self.manifest)
        log.info("erasure report: %s", summary_line(erasure))
        log.info("%s", closing_summary(self.timer.seconds, len(todo), len(done_before), pool, report))
        return report

    def _reusable_stats(self, key: str) -> bool:
        what = f"{self.storage.url}/{key}"
        return artefacts.reusable(self.storage, key, lambda b: second_moment_from_bytes(b, what))

    @staticmethod
    def _text_stats_jobs(concepts: list[Concept], chunk: int = 64) -> list[Job]:
        return [
            Job(
                "text_stats",
                (concepts[i : i + chunk],),
                f"text-stats[{i}:{i + len(concepts[i : i + chunk])}]",
            )
            for i in range(0, len(concepts), chunk)
        ]

    def _erasure_report(self, pool: WorkerPool, fused_ref: Any, bs: int) -> dict[str, Any]:
        """Per-concept residuals and attention mass, and the drift of other prompts, on the
        workers (text encoder, projections, one UNet batch per concept and model)."""
        per_concept: dict[str, dict[str, Any]] = {}
        drift: dict[str, Any] = {}
        batches = [self.concepts[i : i + bs] for i in range(0, len(self.concepts), bs)]
        jobs = [
            Job(
                "erasure_report",
                (b, fused_ref),
                f"report[{b[0].slug}+{len(b) - 1}]",
                lambda job, result: per_concept.update(result),
            )
            for b in batches
        ]
        retain = heldout_prompts(self.p.retain)
        jobs.append(
            Job("drift_report", (fused_ref, retain), "drift-report", lambda job, result: drift.update(result))
        )
        pool.run(jobs)
        return erasure_summary(per_concept, drift, self.p.request.max_residual)

    def _report(
        self,
        notes: dict[str, dict],
        info: dict[str, Any],
        prior_cached: bool,
        pool: WorkerPool,
        erasure: dict[str, Any],
    ) -> dict[str, Any]:
        p, storage, layout = self.p, self.storage, self.layout
        concepts = []
        for c in self.concepts:
            n = notes[c.slug]
            losses = n.get("losses") or [None]
            extra = {k: v for k, v in n.items() if k not in ("losses", "concept")}
            concepts.append(
                {
                    **c.to_dict(),
                    "slug": c.slug,
                    "loss_first": losses[0],
                    "loss_last": losses[-1],
                    **extra,
                    "erasure": erasure["concepts"].get(c.slug),
                }
            )
        return {
            "run_id": p.run_id,
            "status": "complete",
            "output": {
                # Full locations (folder or s3:// URL), all alike.
                "root": f"{storage.url}/{layout.root}",
                "pipeline": f"{storage.url}/{layout.final_pipeline}",
                "erasure": f"{storage.url}/{layout.erasure}",
                "cfr": f"{storage.url}/{layout.cfr_erasure}",
            },
            "model": p.request.model,
            "executor": self.backend.name,
            "workers": pool.summary(),
            "concepts": concepts,
            "whole_image_fallbacks": sum(int(n.get("whole_image_fallbacks", 0)) for n in notes.values()),
            "duplicates": p.concepts.duplicates,
            "erasure": {k: v for k, v in erasure.items() if k != "concepts"},
            **info,
            "prior_cache_hit": prior_cached,
            "settings": p.request.settings.to_dict(),
            "versions": versions(),
            "seconds": self.timer.seconds,
            "resumed": self.manifest.get("resumed", 0),
        }


def closing_summary(
    seconds: dict[str, float], trained: int, reused: int, pool: WorkerPool, report: dict[str, Any]
) -> str:
    """The run's last progress line: time per stage, concepts trained/reused/re-queued, outputs."""
    stages = ", ".join(f"{name} {s:.1f}s" for name, s in seconds.items())
    return (
        f"run {report['run_id']} complete in {sum(seconds.values()):.1f}s ({stages}); concepts: "
        f"{trained} trained, {reused} reused, {pool.requeued_concepts} re-queued after a lost worker; "
        f"outputs: {report['output']['root']}"
    )


def run_status(output: str, run: str, s3_endpoint: str | None = None) -> dict[str, Any]:
    """A run's manifest status and progress, read from storage."""
    storage = open_storage(output, s3_endpoint=s3_endpoint, must_exist=True)
    layout = RunLayout(run)
    if not storage.exists(layout.manifest):
        raise MaceError(f"run {run!r}: no manifest under {storage.url}/{layout.root}")
    manifest = read_json(storage, layout.manifest)
    missing = [
        k for k in ("status", "model", "concepts") if not isinstance(manifest, dict) or k not in manifest
    ]
    if missing:
        where = f"{storage.url}/{layout.manifest}"
        raise MaceError(f"run {run!r}: {where} is not a mace-ray manifest (no {', '.join(missing)})")
    done = artefacts.done_slugs(storage, layout)
    out = {
        "run_id": run,
        "status": manifest["status"],
        "model": manifest["model"],
        "concepts": len(manifest["concepts"]),
        "concepts_done": len(done),
        "resumed": manifest.get("resumed", 0),
        "created": manifest.get("created"),
    }
    if "error" in manifest:
        out["error"] = manifest["error"]
    if manifest["status"] == "complete":
        report = read_json(storage, layout.report)
        out["seconds"] = report.get("seconds")
        if report.get("erasure"):
            out["erasure"] = headline(report["erasure"])
            out["erasure_summary"] = summary_line(report["erasure"])
    return out
