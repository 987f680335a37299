"""The eval job: the paper's evaluation protocols (MACE Sec. 4) over a pool of evaluation workers.

Stages:
  1. prepare (driver, no models loaded): build the prompt suite with fixed seeds, resolve the
     models (an erase run's folder also names its erased and retained concepts), check every
     file and scorer that can be checked, derive the eval id
  2. generate_and_score: shards of prompts per model on ``EvalWorker``s (``WorkerPool``: bounded
     in-flight work, dead workers replaced and their shard re-queued); stored images are reused;
     coco reference images are featurised in the same pool
  3. report: per-model metrics (mace_core.evaluation.scoring.summarise), report.json,
     summary.md, plots/*.png, scores/<tag>.json
The same driver runs in this process (LocalBackend) or on a Ray cluster (RayBackend).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mace_core.concepts import ConceptType, read_concept_file
from mace_core.errors import ModelLoadError
from mace_core.evaluation.errors import EvalInputError
from mace_core.evaluation.features import check_inception_weights
from mace_core.evaluation.metrics import NUDENET_THRESHOLD
from mace_core.evaluation.nudity import check_nudenet
from mace_core.evaluation.prompt_csv import read_coco_csv, read_i2p_csv
from mace_core.evaluation.recognition import check_recognizer
from mace_core.evaluation.scoring import ScorerSettings, suite_needs
from mace_core.evaluation.settings import CLIP_RECOGNIZER, DEFAULT_CLIP, TINY_CLIP, GenerationSettings
from mace_core.evaluation.suites import (
    DEFAULT_IMAGES_PER_PROMPT,
    Suite,
    celebrities_suite,
    coco_suite,
    explicit_suite,
    objects_suite,
    styles_suite,
)
from mace_core.families.model_index import TINY_MODEL
from mace_core.pretrained import looks_like_path, resolve_pretrained
from mace_ray.engine.staged_job import run_staged_job
from mace_ray.eval.layout import EvalLayout
from mace_ray.eval.request import EvalRequest
from mace_ray.eval.stages import EVAL_STAGES, EvalRun
from mace_ray.storage.base import Storage, write_json
from mace_ray.storage.model_cache import is_remote, split_run
from mace_ray.storage.resolve import Sources, canonical, join

log = logging.getLogger("mace_ray")

# Which concept type of an erase run's manifest each suite evaluates.
SUITE_TYPES = {
    "objects": ConceptType.OBJECT,
    "celebrities": ConceptType.CELEBRITY,
    "styles": ConceptType.STYLE,
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
PIPELINE_IN_RUN = ("final", "pipeline")  # an erase run's pipeline, in its folder


@dataclass(frozen=True)
class ResolvedModel:
    spec: str  # what the user gave
    load: str  # what the workers load (an absolute path for folders; an s3:// URL, which they fetch)
    manifest: dict[str, Any] | None  # the erase run's manifest, when the model is one's output

    @property
    def base(self) -> str:
        """The model it derives from: an erase run's base model, else itself."""
        return self.manifest["model"] if self.manifest else self.spec


@dataclass
class PreparedEval:
    request: EvalRequest
    suite: Suite
    models: dict[str, ResolvedModel]
    model_ids: dict[str, str]
    scorers: ScorerSettings
    reference_files: list[str]
    eval_id: str
    notes: list[str]

    @property
    def layout(self) -> EvalLayout:
        return EvalLayout(self.eval_id)

    def start(self, storage: Storage) -> None:
        """Before any worker starts: what is evaluated, in the log, and the suite's prompts, stored."""
        suite = self.suite
        log.info(
            "eval %s: %s suite, %d images per model, models: %s",
            self.eval_id,
            suite.name,
            len(suite.prompts),
            ", ".join(f"{t}={m.spec}" for t, m in self.models.items()),
        )
        write_json(
            storage,
            self.layout.prompts,
            {"suite": suite.name, "source": suite.source, "prompts": [x.to_dict() for x in suite.prompts]},
        )


def _run_manifest(sources: Sources, key: str) -> dict[str, Any]:
    """An erase run's manifest, checked for what eval and audit read of it (its model, and its
    concepts and retained set: each text, type, anchor): a manifest of another shape (edited
    by hand) is bad input, not a bug."""
    manifest = sources.read_json(key, "erase run manifest")
    ok = isinstance(manifest, dict) and isinstance(manifest.get("model"), str)
    for field in ("concepts", "retain"):
        listed = manifest.get(field, []) if ok else None
        ok = ok and isinstance(listed, list)
        ok = ok and all(isinstance(c, dict) and {"text", "type", "anchor"} <= c.keys() for c in listed)
    if not ok:
        raise ModelLoadError(f"{key}: not a mace-ray erase run manifest (its model, concepts, retain)")
    return manifest


def locate_model(spec: str, what: str = "model", sources: Sources | None = None) -> ResolvedModel:
    """'tiny', a hub id, a diffusers folder, an erase run's folder (``runs/<run_id>``, or one
    ``mace-ray pull`` wrote) or its ``final/pipeline``: local, or s3:// read in place (the
    manifest from S3; the pipeline is fetched, verified, by the workers that load it)."""
    if spec == TINY_MODEL or not (is_remote(spec) or looks_like_path(spec)):
        return ResolvedModel(spec, spec, None)
    sources = sources or Sources()
    where = canonical(spec)
    if is_remote(spec) or Path(where).is_dir():
        if sources.exists(join(where, "manifest.json")) and sources.exists(join(where, *PIPELINE_IN_RUN)):
            # An erase run's folder (runs/<run_id>): evaluate its final pipeline.
            manifest = _run_manifest(sources, join(where, "manifest.json"))
            return ResolvedModel(spec, join(where, *PIPELINE_IN_RUN), manifest)
        if sources.exists(join(where, "model_index.json")):
            manifest = None
            parts = split_run(where)
            if parts is not None and parts[2] == "/".join(PIPELINE_IN_RUN):  # runs/<run_id>/final/pipeline
                run_manifest = join(parts[0] or ".", "runs", parts[1], "manifest.json")
                if sources.exists(run_manifest):
                    manifest = _run_manifest(sources, run_manifest)
            return ResolvedModel(spec, where, manifest)
        if sources.exists(join(where, "manifest.json")):
            # An erase run's folder all the same: not finished (partial, interrupted, failed),
            # so it has no final pipeline yet; "not an erase run folder" would mislead.
            raise ModelLoadError(
                f"{what} {spec!r}: an erase run folder without its final pipeline (the run is not "
                "complete: `mace-ray status` shows where it is)"
            )
        if sources.exists(where):
            raise ModelLoadError(
                f"{what} {spec!r}: not a diffusers pipeline folder (no model_index.json) "
                "nor an erase run folder"
            )
    raise ModelLoadError(f"{what} {spec!r}: no such folder")


def model_id(fingerprint: str, generation: GenerationSettings) -> str:
    """Images folder id: the same model content (``mace_core.fingerprint``, whatever its path)
    and generation settings -> the same stored images. A folder changed in place, or an
    erase rerun with --no-resume to the same path, is another model: its images are made anew."""
    key = json.dumps({"model": fingerprint, "generation": generation.to_dict()}, sort_keys=True)
    return f"model-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _names(req: EvalRequest, model: ResolvedModel, which: str) -> tuple[list[str], str]:
    """Erased or retained names: from the concept file given, else from the erase run's manifest."""
    path = req.erased_file if which == "erased" else req.retained_file
    if path:
        return [c.text for c in read_concept_file(path, SUITE_TYPES[req.suite]).concepts], path
    if model.manifest:
        key = "concepts" if which == "erased" else "retain"
        wanted = SUITE_TYPES[req.suite].value
        return [
            c["text"] for c in model.manifest.get(key, []) if c.get("type") == wanted
        ], "erase run manifest"
    return [], ""


def build_suite(req: EvalRequest, model: ResolvedModel) -> Suite:
    n = req.images_per_prompt or (len(req.seeds) if req.seeds else DEFAULT_IMAGES_PER_PROMPT[req.suite])
    seeds = tuple(req.seeds) if req.seeds else None
    if req.suite in ("explicit", "coco"):
        if not req.prompts_csv:
            cols = "prompt (I2P)" if req.suite == "explicit" else "caption (and image_id)"
            raise EvalInputError(f"the {req.suite} suite needs --prompts-csv FILE (a CSV with column {cols})")
        read = read_i2p_csv if req.suite == "explicit" else read_coco_csv
        make = explicit_suite if req.suite == "explicit" else coco_suite
        rows, skipped = read(req.prompts_csv)
        return make(rows, skipped, n, req.seed, seeds, req.limit, source=req.prompts_csv)
    if req.prompts_csv:
        raise EvalInputError(f"--prompts-csv is for the explicit and coco suites, not {req.suite}")
    erased, erased_src = _names(req, model, "erased")
    if not erased:
        raise EvalInputError(
            f"the {req.suite} suite needs the erased {SUITE_TYPES[req.suite].value} concepts: "
            "pass --erased FILE (a concept file, e.g. jobs/cifar10/dog.txt) or evaluate an erase run's output"
        )
    if req.suite == "objects":
        if req.retained_file:
            raise EvalInputError(
                "--retained is for the celebrities and styles suites (objects keeps every other class)"
            )
        return objects_suite(erased, n, req.seed, seeds)
    retained, retained_src = _names(req, model, "retained")
    source = " + ".join(s for s in (erased_src, retained_src) if s)
    make = celebrities_suite if req.suite == "celebrities" else styles_suite
    return make(erased, retained, n, req.seed, seeds, source)


def _reference_files(req: EvalRequest) -> list[str]:
    if not req.reference_images:
        return []
    if req.suite != "coco":
        raise EvalInputError(f"--reference-images is for the coco suite (FID), not {req.suite}")
    folder = Path(req.reference_images).expanduser().resolve()
    if not folder.is_dir():
        raise EvalInputError(f"reference images folder {req.reference_images!r} does not exist")
    files = sorted(str(p) for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if len(files) < 2:
        raise EvalInputError(
            f"reference images folder {req.reference_images!r} has {len(files)} image(s); "
            "FID needs at least 2"
        )
    return files


def _scorers(req: EvalRequest, models: dict[str, ResolvedModel]) -> ScorerSettings:
    needs = suite_needs(req.suite)
    clip = req.clip
    if clip is None:
        # The built-in tiny models get the built-in tiny CLIP; real models the real one.
        clip = TINY_CLIP if all(m.base == TINY_MODEL for m in models.values()) else DEFAULT_CLIP
    elif clip != TINY_CLIP and "clip" in needs:
        resolve_pretrained(clip, "CLIP model")  # a local folder must exist (errors name it)
    fid_weights = None
    if req.fid_weights:
        if "fid" not in needs:
            raise EvalInputError(f"--fid-weights is for the coco suite (FID), not {req.suite}")
        fid_weights = str(check_inception_weights(req.fid_weights).resolve())
    if "nudenet" in needs:
        check_nudenet()
    if "recognizer" in needs:
        check_recognizer(req.recognizer)
    return ScorerSettings(
        clip=clip if "clip" in needs else None,
        recognizer=req.recognizer if "recognizer" in needs else None,
        fid_weights=fid_weights,
        nudenet_threshold=NUDENET_THRESHOLD if "nudenet" in needs else None,
    )


def prepare(req: EvalRequest) -> PreparedEval:
    """Stage 1, on the driver: everything that can be wrong with the inputs fails here, before
    any worker starts or anything is written."""
    sources = Sources(req.s3_endpoint)
    models = {"model": locate_model(req.model, sources=sources)}
    if req.baseline:
        models["baseline"] = locate_model(req.baseline, "baseline", sources)
    suite = build_suite(req, models["model"])
    scorers = _scorers(req, models)
    reference = _reference_files(req)
    # By content: every file of the model that can change an image (hashes are cached by file stat).
    # An s3:// run's pipeline by the checksums its run recorded: the fingerprint of any copy of it.
    fingerprints = {t: sources.fingerprint(m.load).full for t, m in models.items()}
    model_ids = {t: model_id(fingerprints[t], req.generation) for t, m in models.items()}
    notes: list[str] = []
    if req.suite == "celebrities" and scorers.recognizer == CLIP_RECOGNIZER:
        notes.append(
            "celebrity recognition: CLIP zero-shot over the suite's names (the paper used GIPHY's detector)"
        )
    if req.suite == "coco":
        if not reference:
            notes.append("no --reference-images: FID against real images not computed")
        if not scorers.fid_weights:
            notes.append("FID on CLIP image features (no --fid-weights): not comparable to Inception FIDs")
    key = {
        "suite": suite.name,
        "prompts": [p.id for p in suite.prompts],
        "models": {t: model_ids[t] for t in sorted(model_ids)},
        "scorers": scorers.to_dict(),
        "reference": reference,
    }
    eval_id = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return PreparedEval(req, suite, models, model_ids, scorers, reference, eval_id, notes)


def run_eval(req: EvalRequest) -> dict[str, Any]:
    """Run an evaluation; returns the report. Raises MaceError on bad input."""
    return run_staged_job(req, prepare, EvalRun, EVAL_STAGES)
