"""The erase job: concept list in, erased pipeline out, in the run layout of DESIGN.md.

Stages (each resumable from storage):
  1. prepare: parse and validate the concept list, load the model, derive the run id
  2. text statistics per concept, prior (cached) and domain statistics
  3. CFR: sum the statistics, solve M, W' = W M
  4. per concept batch: images, masks, LoRA (DONE marker last)
  5. fusion: stream every concept's terms into the sums, solve W*, write the model
This module runs them in one process; the Ray executor distributes stages 2 and 4 and
runs the sums in a statistics actor, calling the same functions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save

import mace_core
from mace_core.cfr import apply_cfr, cfr_matrix
from mace_core.checkpoints import erasure_bytes, save_pipeline
from mace_core.concept_job import ConceptBatchWorker
from mace_core.concepts import Concept, ConceptList, ConceptType, read_concept_file
from mace_core.errors import ConceptError
from mace_core.fusion import FusionSums, fuse
from mace_core.models import get_attn2_weights, load_pipeline, pick_device, set_attn2_weights
from mace_core.prompts import domain_prompts, generation_prompt, prompt_pairs
from mace_core.settings import EraseSettings
from mace_core.text_stats import (
    MappingStats,
    SecondMoment,
    TextEncoder,
    concept_text_stats,
    default_captions_path,
    model_identity,
    prior_cache_key,
    prompt_second_moment,
    read_captions,
    second_moment_bytes,
    second_moment_from_bytes,
)
from mace_ray import artefacts
from mace_ray.layout import RunLayout
from mace_ray.layout import prior_cache_key as prior_key_path
from mace_ray.storage import Storage, open_storage, read_json, write_json

log = logging.getLogger("mace_ray")


@dataclass(frozen=True)
class EraseRequest:
    concept_file: str
    model: str = "CompVis/stable-diffusion-v1-4"
    output: str = "mace-runs"
    default_type: ConceptType = ConceptType.OBJECT
    settings: EraseSettings = field(default_factory=EraseSettings)
    prior_captions: str | None = None
    retain_file: str | None = None
    device: str | None = None
    concepts_per_batch: int = 4
    s3_endpoint: str | None = None


@dataclass
class Prepared:
    """Validated inputs: what every later stage needs."""

    request: EraseRequest
    concepts: ConceptList
    retain: list[Concept]
    captions: list[str]
    pipe: Any
    device: torch.device
    encoder: TextEncoder
    model_fingerprint: str
    run_id: str


class Timer:
    """Seconds per stage, logged as progress lines of the job log."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        log.info("stage %s: started", name)
        yield
        dt = time.perf_counter() - t
        self.seconds[name] = round(self.seconds.get(name, 0.0) + dt, 3)
        log.info("stage %s: done in %.1fs", name, dt)


def versions() -> dict[str, str]:
    import diffusers
    import transformers

    return {
        "mace-ray": mace_core.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }


def validate_prompts(
    encoder: TextEncoder, concepts: list[Concept], n_prompts: int | None, source: str
) -> None:
    """Every prompt of every concept must fit the text encoder; errors name the concept."""
    for c in concepts:
        for pair in prompt_pairs(c, n_prompts):
            encoder.check_length(pair.concept, f"{source}: concept {c.text!r}")
            encoder.check_length(pair.anchor, f"{source}: anchor {c.anchor!r} of concept {c.text!r}")
        encoder.check_length(generation_prompt(c), f"{source}: concept {c.text!r}")


def compute_run_id(
    model: str,
    fingerprint: str,
    concepts: list[Concept],
    retain: list[Concept],
    captions_key: str,
    s: EraseSettings,
) -> str:
    """Same model, concepts and settings -> same run id -> resume instead of redo."""
    spec = {
        "model": model,
        "fingerprint": fingerprint,
        "concepts": [c.to_dict() for c in concepts],
        "retain": [c.to_dict() for c in retain],
        "prior": captions_key,
        "settings": s.to_dict(),
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def prepare(req: EraseRequest) -> Prepared:
    """Stage 1. Everything that can be wrong with the inputs fails here, before any write."""
    concepts = read_concept_file(req.concept_file, req.default_type)
    retain: list[Concept] = []
    if req.retain_file:
        retain = read_concept_file(req.retain_file, req.default_type).concepts
        clash = {c.key for c in retain} & {c.key for c in concepts.concepts}
        if clash:
            raise ConceptError(f"{req.retain_file}: concepts both erased and retained: {sorted(clash)[:5]}")
    captions = read_captions(req.prior_captions or default_captions_path())
    device = pick_device(req.device)
    pipe = load_pipeline(req.model).to(device)
    encoder = TextEncoder(pipe.tokenizer, pipe.text_encoder, device)
    validate_prompts(encoder, concepts.concepts, req.settings.prompts_per_concept, concepts.source)
    validate_prompts(encoder, retain, req.settings.prompts_per_concept, req.retain_file or "")
    fingerprint = model_identity(pipe)
    run_id = compute_run_id(
        req.model,
        fingerprint,
        concepts.concepts,
        retain,
        prior_cache_key(fingerprint, captions),
        req.settings,
    )
    return Prepared(req, concepts, retain, captions, pipe, device, encoder, fingerprint, run_id)


def prior_statistics(storage: Storage, p: Prepared) -> tuple[SecondMoment, bool]:
    """C_p from the caption file, cached under cache/prior/ (keyed by text encoder + captions)."""
    key = prior_key_path(prior_cache_key(p.model_fingerprint, p.captions))
    if storage.exists(key):
        return second_moment_from_bytes(storage.read_bytes(key), f"{storage.url}/{key}"), True
    prior = prompt_second_moment(p.encoder, p.captions)
    storage.write_bytes(key, second_moment_bytes(prior, {"captions": str(len(p.captions))}))
    return prior, False


def text_statistics(storage: Storage, layout: RunLayout, p: Prepared) -> dict[str, Any]:
    """Stage 2: per-concept statistics, written per concept, reused when present."""
    n_prompts = p.request.settings.prompts_per_concept
    out = {}
    for c in p.concepts.concepts:
        if storage.exists(layout.stats(c.slug)):
            out[c.slug] = artefacts.read_text_stats(storage, layout, c.slug)
            continue
        stats = concept_text_stats(p.encoder, c, n_prompts)
        artefacts.write_text_stats(storage, layout, c.slug, stats)
        out[c.slug] = stats
    return out


def domain_statistics(p: Prepared) -> SecondMoment | None:
    if not p.retain:
        return None
    prompts = []
    for c in p.retain:
        prompts += domain_prompts([c.text], c.type)[: p.request.settings.prompts_per_concept]
    return prompt_second_moment(p.encoder, prompts)


def open_run(storage: Storage, layout: RunLayout, p: Prepared) -> dict[str, Any]:
    if storage.exists(layout.manifest):
        manifest = read_json(storage, layout.manifest)
        if manifest["status"] != "complete":
            manifest["resumed"] = manifest.get("resumed", 0) + 1
    else:
        manifest = {
            "run_id": p.run_id,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "model": p.request.model,
            "model_fingerprint": p.model_fingerprint,
            "concepts": [c.to_dict() for c in p.concepts.concepts],
            "retain": [c.to_dict() for c in p.retain],
            "duplicates": p.concepts.duplicates,
            "prior_captions": p.request.prior_captions or "builtin",
            "settings": p.request.settings.to_dict(),
            "versions": versions(),
            "status": "running",
            "resumed": 0,
        }
    if manifest["status"] != "complete":
        manifest["status"] = "running"
        write_json(storage, layout.manifest, manifest)
    return manifest


def run_erase(req: EraseRequest) -> dict[str, Any]:
    """Run (or resume) an erase; returns the report. Raises MaceError on bad input."""
    timer = Timer()
    with timer.stage("prepare"):
        p = prepare(req)
    storage = open_storage(req.output, s3_endpoint=req.s3_endpoint)
    layout = RunLayout(p.run_id)
    manifest = open_run(storage, layout, p)
    log.info("run %s at %s/%s (%d concepts)", p.run_id, storage.url, layout.root, len(p.concepts.concepts))
    for d in p.concepts.duplicates:
        log.warning(
            "%s:%s duplicate of line %s dropped: %s", p.concepts.source, d["line"], d["first_line"], d["text"]
        )
    if manifest["status"] == "complete":
        log.info("run %s is already complete; nothing to do", p.run_id)
        return read_json(storage, layout.report)
    try:
        return _run_stages(storage, layout, p, timer, manifest)
    except BaseException as e:
        manifest["status"] = "failed"
        manifest["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500]
        write_json(storage, layout.manifest, manifest)
        raise


def _run_stages(storage: Storage, layout: RunLayout, p: Prepared, timer: Timer, manifest: dict) -> dict:
    s = p.request.settings
    unet = p.pipe.unet
    original = get_attn2_weights(unet)
    with timer.stage("text_statistics"):
        prior, prior_cached = prior_statistics(storage, p)
        domain = domain_statistics(p)
        stats = text_statistics(storage, layout, p)

    with timer.stage("cfr"):
        mapping = MappingStats.zeros(p.encoder.dim)
        for c in p.concepts.concepts:
            mapping += stats[c.slug].mapping
        M, cfr_raw = cfr_matrix(mapping, s.cfr, prior, domain)
        storage.write_bytes(layout.cfr_matrix, st_save({"M": M.contiguous()}, metadata={"n": str(mapping.n)}))
        refined = apply_cfr(original, M)

    with timer.stage("train"):
        done = artefacts.done_slugs(storage, layout)
        todo = [c for c in p.concepts.concepts if c.slug not in done]
        log.info("train: %d concepts done before, %d to do", len(done), len(todo))
        worker = ConceptBatchWorker(p.pipe, s, p.device, original, refined)
        bs = max(1, p.request.concepts_per_batch)
        for i in range(0, len(todo), bs):
            batch = todo[i : i + bs]
            stored = [
                artefacts.read_images(storage, layout, c.slug, s.data.images_per_concept) for c in batch
            ]
            images = [x[0] for x in stored] if all(x is not None for x in stored) else None
            for art in worker.process(batch, images):
                artefacts.write_concept(storage, layout, art)
            log.info(
                "train: %d/%d concepts done", min(i + bs, len(todo)) + len(done), len(p.concepts.concepts)
            )

    with timer.stage("fusion"):
        sums = FusionSums.zeros(p.encoder.dim)
        notes = {}
        for c in p.concepts.concepts:
            lora = artefacts.read_lora(storage, layout, c.slug)
            sums.add_concept(stats[c.slug].fusion, lora)
            notes[c.slug] = artefacts.read_notes(storage, layout, c.slug)
        fused, fusion_raw = fuse(sums, original, refined, s.fusion, prior, domain)

    with timer.stage("write"):
        meta = {"base_model": p.request.model, "run_id": p.run_id, "model_fingerprint": p.model_fingerprint}
        set_attn2_weights(unet, fused)
        try:
            with tempfile.TemporaryDirectory(prefix="mace-final-") as tmp:
                save_pipeline(p.pipe, Path(tmp))
                storage.put_dir(Path(tmp), layout.final_pipeline)
        finally:
            set_attn2_weights(unet, original)
        storage.write_bytes(layout.erasure, erasure_bytes(fused, meta))

    report = {
        "run_id": p.run_id,
        "status": "complete",
        "output": {
            "root": f"{storage.url}/{layout.root}",
            "pipeline": layout.final_pipeline,
            "erasure": layout.erasure,
        },
        "model": p.request.model,
        "device": str(p.device),
        "concepts": [
            {
                **c.to_dict(),
                "slug": c.slug,
                "loss_first": notes[c.slug]["losses"][0] if notes[c.slug]["losses"] else None,
                "loss_last": notes[c.slug]["losses"][-1] if notes[c.slug]["losses"] else None,
                **{k: v for k, v in notes[c.slug].items() if k not in ("losses", "concept")},
            }
            for c in p.concepts.concepts
        ],
        "duplicates": p.concepts.duplicates,
        "tokens": {
            "cfr_pairs": mapping.n,
            "fusion": sums.C.n,
            "prior": prior.n,
            "domain": domain.n if domain else 0,
        },
        "raw_weights": {"cfr": cfr_raw.to_dict(), "fusion": fusion_raw.to_dict()},
        "prior_cache_hit": prior_cached,
        "settings": s.to_dict(),
        "versions": versions(),
        "seconds": timer.seconds,
        "resumed": manifest.get("resumed", 0),
    }
    write_json(storage, layout.report, report)
    manifest["status"] = "complete"
    manifest.pop("error", None)
    write_json(storage, layout.manifest, manifest)
    return report
