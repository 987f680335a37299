"""The erase job: concept list in, erased pipeline out, in the run layout of ``mace_ray.erase.layout``.

``prepare`` (on the driver) parses and validates the concept list, fingerprints the model
(every file that counts, ``mace_core.fingerprint``) and derives the run id; then, under
the run's lock, the stages of ``mace_ray.erase.stages`` run, each resumable from storage.
The same driver runs in this process (LocalBackend) or on a Ray cluster (RayBackend).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from mace_core import version
from mace_core.closed_form_weights import domain_phrase, profile_type
from mace_core.concepts import Concept, ConceptList, ConceptType, read_concept_file
from mace_core.errors import ArtefactError, ConceptError, MaceError, quoted
from mace_core.families.base import PromptEncoder
from mace_core.families.model_index import TINY_MODEL
from mace_core.fingerprint import ModelFingerprint
from mace_core.model_files import check_model_files
from mace_core.models import load_prompt_encoder, pick_device
from mace_core.prompts import (
    domain_prompts,
    generation_prompt,
    heldout_pairs,
    prompt_data_digest,
    prompt_pairs,
)
from mace_core.settings import EraseSettings
from mace_core.text_stats import (
    default_captions_path,
    prior_cache_key,
    read_captions,
)
from mace_ray.engine.backend import Backend, backend_for
from mace_ray.engine.placement import check_placeable
from mace_ray.engine.pool import worker_shape
from mace_ray.engine.provenance import versions
from mace_ray.engine.stages import Stage, Timer
from mace_ray.erase import artefacts
from mace_ray.erase.extend import BaseRun, extend_request, merge_concepts
from mace_ray.erase.layout import RunLayout
from mace_ray.erase.locate import check_masker_inputs
from mace_ray.erase.plan import needs_masker, plan_stages
from mace_ray.erase.request import EraseRequest
from mace_ray.erase.run import EraseRun
from mace_ray.erase.run_report import closing_summary
from mace_ray.erase.stopping import CTRL_C, Interrupted, RunStop, on_sigterm, stopped_by
from mace_ray.storage.base import Storage, read_json, write_json
from mace_ray.storage.lease import RunLock, RunLocked
from mace_ray.storage.model_cache import TEXT_COMPONENTS
from mace_ray.storage.probe import preflight_storage
from mace_ray.storage.resolve import Sources

log = logging.getLogger("mace_ray")


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
    method: str = "mace"  # "cfr": closed-form refinement only (--method cfr)
    stages: tuple[Stage[Any], ...] = ()  # what this driver runs (--stages)
    extends: str | None = None  # the run --from named (its concepts come first)
    # How the driver reads its inputs (the output's client for those under it): the finish
    # stage fingerprints the model again through it.
    sources: Sources | None = field(default=None, repr=False, compare=False)

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


def validate_prompts(
    encoder: PromptEncoder, concepts: list[Concept], n_prompts: int | None, source: str
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
    method: str = "mace",
) -> str:
    """Same model, concepts, settings, prompt files and method version -> same run id ->
    resume instead of redo.

    Batching, executor, worker counts and the stages of a partial run are not part of it:
    they do not change the result. A closed-form-only run (method "cfr") is another result;
    so is a run with other prompt templates or held-out prompts (``prompt_data_digest``) or
    by another version of the method (``mace_core.version``): its artefacts are never resumed
    into this run's.
    """
    spec: dict[str, Any] = {
        "model": model,
        "fingerprint": fingerprint,
        "concepts": [c.to_dict() for c in concepts],
        "retain": [c.to_dict() for c in retain],
        "prior": prior_key,
        "settings": settings.to_dict(),
        "prompt_files": prompt_data_digest(),
        "method_version": version.METHOD_VERSION,
    }
    if method != "mace":  # the method's own run ids stay as they were
        spec["method"] = method
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def prepare(req: EraseRequest, base: BaseRun | None = None, sources: Sources | None = None) -> Prepared:
    """Stage 1, on the driver. Everything that can be wrong with the inputs fails here,
    before anything is written; only the tokenizer and text encoder are loaded. ``base``:
    the run that ``--from`` extends (its concepts come first, its retained set is kept).
    ``sources``: how the inputs are read (s3:// ones through the output's client where they
    lie under it, ``mace_ray.storage.resolve``)."""
    sources = sources or Sources(req.s3_endpoint)
    method, stages = plan_stages(req.stages, req.method)
    concepts = read_concept_file(req.concept_file, req.default_type)
    retain: list[Concept] = []
    if base is not None:
        concepts = merge_concepts(base, concepts)
        retain = base.retain
    elif req.retain_file:
        retain = read_concept_file(req.retain_file, req.default_type).concepts
        clash = {c.key for c in retain} & {c.key for c in concepts.concepts}
        if clash:
            raise ConceptError(f"{req.retain_file}: concepts both erased and retained: {sorted(clash)[:5]}")
    captions = read_captions(req.prior_captions or default_captions_path())
    # An s3:// model is fetched (text components only) into the local model cache.
    encoder = load_prompt_encoder(sources.pipeline(req.model, TEXT_COMPONENTS), torch.device("cpu"))
    # What the workers will load, checked here, before anything is written (not when a
    # worker fails to load it stages later): the model's components (a local folder's),
    # and the masker's detector and segmenter where the workers load one (a
    # closed-form-only run makes no masks and needs none).
    check_model_files(req.model)
    if needs_masker(method, stages):
        check_masker_inputs(req.settings.masks, req.model == TINY_MODEL, sources)
    n = req.settings.prompts_per_concept
    validate_prompts(encoder, concepts.concepts, n, concepts.source)
    validate_prompts(encoder, retain, n, req.retain_file or "")
    # Every file of the model that can change the result: a model changed in place is a new run.
    fingerprint = sources.fingerprint(req.model)
    prior_key = prior_cache_key(fingerprint.text, captions)
    run_id = compute_run_id(
        req.model, fingerprint.full, concepts.concepts, retain, prior_key, req.settings, method
    )
    profile = profile_type(c.type for c in concepts.concepts)
    extends = base.run_id if base is not None else None
    return Prepared(
        req,
        concepts,
        retain,
        captions,
        fingerprint,
        prior_key,
        run_id,
        profile,
        method,
        stages,
        extends,
        sources,
    )


def read_manifest(storage: Storage, layout: RunLayout) -> dict[str, Any]:
    """The run's manifest; one that is valid JSON of another shape (edited by hand) is bad
    input, not a bug, and --no-resume starts the run over."""
    manifest = read_json(storage, layout.manifest)
    if not isinstance(manifest, dict):
        raise ArtefactError(
            f"{storage.url}/{layout.manifest} is not a mace-ray manifest (--no-resume starts the run over)"
        )
    return manifest


def earlier_run(storage: Storage, layout: RunLayout, p: Prepared) -> dict[str, Any] | None:
    """The manifest of an earlier driver of this run, if any (nothing is written). A complete
    run whose outputs no longer match their checksums comes back as not complete."""
    if not storage.exists(layout.manifest):
        return None
    manifest = read_manifest(storage, layout)
    if manifest.get("status") == "complete":
        problem = check_outputs(storage, layout, manifest)
        if problem is not None:
            log.warning("run %s was complete, but %s: its final stages run again", p.run_id, problem)
            manifest["status"] = "damaged"
    elif manifest.get("status") == "running":
        # Called under the run's lease: the driver that wrote "running" is gone (killed,
        # its node lost) without a word. Its run is interrupted, and resumes as such.
        log.warning("run %s was left running by a driver that is gone; resuming it", p.run_id)
        manifest["status"] = "interrupted"
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
            "method": p.method,
            "extends": p.extends,
            "versions": versions(),
            "resumed": 0,
        }
    manifest["status"] = "running"
    manifest.pop("error", None)
    write_json(storage, layout.manifest, manifest)
    return manifest


def check_outputs(storage: Storage, layout: RunLayout, manifest: dict[str, Any]) -> str | None:
    """Why a complete run's outputs cannot be returned as they are (a file missing or not
    matching the checksum recorded when it was written: final files, and each concept's LoRA
    and notes), or None when they all hold. Files are hashed as they stream, never held whole."""
    sums = manifest.get("outputs")
    if not isinstance(sums, dict) or not sums:
        return "it records no checksums of its outputs"
    try:
        read_json(storage, layout.report)
    except MaceError as e:
        return f"its report is unreadable ({str(e)[:120]})"
    return artefacts.mismatch(storage, sums)


# The run lock's lease: renewed every LOCK_HEARTBEAT_S, stale after LOCK_TTL_S without renewal
# (a driver killed on another host blocks its run that long; on the same host, not at all).
LOCK_TTL_S, LOCK_HEARTBEAT_S = 60.0, 15.0


def run_erase(req: EraseRequest) -> dict[str, Any]:
    """Run (or resume) an erase; returns the report. Raises MaceError on bad input, and then
    has written nothing (no run folder, no lease, no cache)."""
    timer = Timer()
    # Storage and device first, in seconds: a bad output (an unreachable or read-only S3
    # bucket too) or device is reported before any model is loaded, and nothing is created.
    # The output is opened once: --from, the model, the detector and segmenter (read through
    # its client where they lie under it) and, stages later, the prior cache use that object.
    storage = preflight_storage(req.output, req.s3_endpoint)
    sources = Sources(req.s3_endpoint, output=storage)
    if req.device is not None:
        pick_device(req.device)
    with timer.stage("prepare"):
        base = None
        if req.extend:  # the union run: the earlier run's inputs plus the new concepts
            req, base = extend_request(storage, req, sources)
        p = prepare(req, base, sources)
    layout = RunLayout(p.run_id)
    # One driver per run: a second one waits for the first (then finds the run complete),
    # or refuses in one line naming it. The lease lives outside the run's folder, which
    # --no-resume deletes.
    lock = RunLock(storage, layout.lock, ttl_s=LOCK_TTL_S, heartbeat_s=LOCK_HEARTBEAT_S)
    if req.resume:
        done = complete_report(storage, layout, p, lock, req.lock_wait_s)
        if done is not None:
            return done
    # SIGTERM handled again inside: ray.init installs its own handler for it.
    with backend_for(req.executor, req.address) as backend, on_sigterm():
        # Before anything is written, the lease included: a worker shape that no node can
        # hold fails in one line (after a bounded wait when an autoscaler may add one)
        # instead of pending forever, and leaves no folder behind.
        _, resources = worker_shape(backend, req.workers, req.gpus_per_worker, 1)
        what = f"--gpus-per-worker {req.gpus_per_worker:g}" if req.gpus_per_worker else None
        check_placeable(backend, resources, 1, req.placement_wait_s, what=what)
        lock.acquire(wait_s=req.lock_wait_s)
        timer.on_start = lambda stage: lock.check()
        try:
            # Every write of the driver checks the lease first (its workers', their own copy).
            return _run_locked(req, p, storage.guarded(lock.check), layout, timer, lock, backend)
        finally:
            lock.release()


def complete_report(
    storage: Storage, layout: RunLayout, p: Prepared, lock: RunLock, wait_s: float
) -> dict[str, Any] | None:
    """The report of a complete run whose outputs hold, checked under its lease and without
    starting a cluster; None when the run is not complete (then it runs, or resumes)."""
    if not storage.exists(layout.manifest) or read_manifest(storage, layout).get("status") != "complete":
        return None
    lock.acquire(wait_s=wait_s)
    try:
        earlier = earlier_run(storage, layout, p)
        if earlier is None or earlier["status"] != "complete":
            return None
        log.info("run %s is already complete (its outputs match their checksums); nothing to do", p.run_id)
        return read_json(storage, layout.report)
    finally:
        lock.release()


def _run_locked(
    req: EraseRequest,
    p: Prepared,
    storage: Storage,
    layout: RunLayout,
    timer: Timer,
    lock: RunLock,
    backend: Backend,
) -> dict[str, Any]:
    if not req.resume and storage.exists(layout.manifest):
        log.info("--no-resume: deleting the earlier state of run %s", p.run_id)
        storage.delete_prefix(layout.root)
    earlier = earlier_run(storage, layout, p)
    if earlier is not None and earlier["status"] == "complete":  # completed while we waited
        log.info("run %s is already complete (its outputs match their checksums); nothing to do", p.run_id)
        return read_json(storage, layout.report)
    manifest = open_run(storage, layout, p, earlier)
    # From here a stop (SIGTERM, Ctrl-C) leaves the run "interrupted" with its lease
    # released, at once (mace_ray/erase/stopping.py): `ray job stop` kills 3 s later.
    stop = RunStop(storage, layout.manifest, manifest, lock)
    with on_sigterm(stop.record):
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
        run = EraseRun(backend, p, storage, layout, timer, manifest, lock)
        try:
            report = run.run()
        except BaseException as e:
            # Stopped from outside (SIGTERM on preemption, Ctrl-C): nothing went wrong and
            # the rerun resumes, so say so rather than "failed".
            halt = stopped_by(e)
            if halt is not None or stop.recorded:
                why = str(halt or e) or (CTRL_C if isinstance(halt, KeyboardInterrupt) else "")
                stop.record(f"{type(halt or e).__name__}: {why}"[:500])
                if halt is not None and halt is not e:
                    raise halt from None  # surfaced through C code (Ray's wait) as a SystemError
                if halt is None:  # the lease went with the stop before this error: a stop, not a failure
                    raise Interrupted("signal SIGTERM") from e
                raise
            manifest["status"] = "failed"
            manifest["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500]
            if isinstance(e, RunLocked):  # a worker found the lease lost: look now, do not wait for a beat
                lock.verify()
            if lock.lost:  # it must not write over the new holder's run: say so (one line) and stop
                lock.check()
            write_json(storage, layout.manifest, manifest)
            raise
    if run.stages[-1].name != "finish":  # a partial run: the full run takes it up
        manifest["status"] = "partial"
        manifest["stages_done"] = [st.name for st in run.stages]
        write_json(storage, layout.manifest, manifest)
        report = {
            "run_id": p.run_id,
            "status": "partial",
            "stages": manifest["stages_done"],
            "output": {"root": f"{storage.url}/{layout.root}"},
        }
        run.report = report
    log.info("%s", closing_summary(run))
    return report
