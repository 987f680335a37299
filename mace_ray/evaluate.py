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
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mace_core.concepts import ConceptType, read_concept_file
from mace_core.errors import ModelLoadError
from mace_core.evaluation.clip_model import DEFAULT_CLIP, TINY_CLIP
from mace_core.evaluation.errors import EvalInputError
from mace_core.evaluation.features import check_inception_weights
from mace_core.evaluation.fid import FeatureMoments, fid, moments_bytes, moments_from_bytes
from mace_core.evaluation.generation import GenerationSettings
from mace_core.evaluation.metrics import NUDENET_THRESHOLD
from mace_core.evaluation.nudity import check_nudenet
from mace_core.evaluation.plots import report_plots
from mace_core.evaluation.prompt_csv import read_coco_csv, read_i2p_csv
from mace_core.evaluation.recognition import CLIP_RECOGNIZER, check_recognizer
from mace_core.evaluation.scoring import ImageScore, ScorerSettings, ShardScores, suite_needs, summarise
from mace_core.evaluation.suites import (
    DEFAULT_IMAGES_PER_PROMPT,
    SUITES,
    Suite,
    celebrities_suite,
    coco_suite,
    explicit_suite,
    objects_suite,
    styles_suite,
)
from mace_core.evaluation.summary import markdown_summary
from mace_core.models import TINY_MODEL
from mace_core.pretrained import looks_like_path, resolve_pretrained
from mace_ray.erase import EXECUTORS, Timer, backend_for, versions
from mace_ray.eval_layout import EvalLayout, images_prefix, reference_cache_key
from mace_ray.eval_worker import EvalSpec, EvalWorker
from mace_ray.pool import Job, WorkerPool, worker_shape
from mace_ray.resources import Resources
from mace_ray.storage import Storage, open_storage, write_json

log = logging.getLogger("mace_ray")

# Which concept type of an erase run's manifest each suite evaluates.
SUITE_TYPES = {
    "objects": ConceptType.OBJECT,
    "celebrities": ConceptType.CELEBRITY,
    "styles": ConceptType.STYLE,
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MODEL_TAGS = ("baseline", "model")  # print order: the original first


@dataclass(frozen=True)
class EvalRequest:
    model: str
    suite: str
    baseline: str | None = None  # the original model: evaluated in the same run, printed beside
    output: str = "mace-runs"
    erased_file: str | None = None  # concept file; default: the erase run's concepts
    retained_file: str | None = None  # concept file; default: the erase run's retained set
    prompts_csv: str | None = None  # explicit: I2P CSV; coco: captions CSV
    reference_images: str | None = None  # coco: folder of real images for FID
    limit: int | None = None  # first N rows of a prompt CSV
    images_per_prompt: int | None = None  # None: the suite's default (the paper's)
    seeds: tuple[int, ...] | None = None  # explicit seeds for every prompt
    seed: int = 0  # base of the derived seeds
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    clip: str | None = None  # None: tiny for tiny models, else DEFAULT_CLIP
    recognizer: str = CLIP_RECOGNIZER
    fid_weights: str | None = None
    executor: str = "ray"
    address: str | None = None
    workers: int | None = None
    gpus_per_worker: float | None = None
    device: str | None = None
    shard_size: int = 32  # images per worker job
    s3_endpoint: str | None = None
    resume: bool = True
    progress: bool = True  # progress bars and lines while images are made (--quiet: off)

    def __post_init__(self) -> None:
        if self.executor not in EXECUTORS:
            raise ValueError(f"unknown executor {self.executor!r} (valid: {', '.join(EXECUTORS)})")
        if self.suite not in SUITES:
            raise ValueError(f"unknown suite {self.suite!r} (valid: {', '.join(SUITES)})")
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size}")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.seeds and self.images_per_prompt is not None:
            raise ValueError("give --seeds or --images-per-prompt, not both (one image per listed seed)")


@dataclass(frozen=True)
class ResolvedModel:
    spec: str  # what the user gave
    load: str  # what load_pipeline gets (absolute path for folders)
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


def _read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, json.JSONDecodeError) as e:
        raise EvalInputError(f"erase run manifest {str(path)!r} cannot be read: {e}") from None


def resolve_model(spec: str, what: str = "model") -> ResolvedModel:
    """'tiny', a hub id, a diffusers folder, an erase run's final/pipeline folder or run folder."""
    if spec == TINY_MODEL or not looks_like_path(spec):
        return ResolvedModel(spec, spec, None)
    p = Path(spec).expanduser().resolve()
    if not p.is_dir():
        raise ModelLoadError(f"{what} {spec!r}: no such folder")
    if (p / "manifest.json").is_file() and (p / "final" / "pipeline").is_dir():
        # An erase run's folder (runs/<run_id>): evaluate its final pipeline.
        return ResolvedModel(spec, str(p / "final" / "pipeline"), _read_manifest(p / "manifest.json"))
    if not (p / "model_index.json").is_file():
        raise ModelLoadError(
            f"{what} {spec!r}: not a diffusers pipeline folder (no model_index.json) nor an erase run folder"
        )
    manifest = None
    if p.name == "pipeline" and p.parent.name == "final":  # runs/<run_id>/final/pipeline
        manifest = _read_manifest(p.parent.parent / "manifest.json")
    return ResolvedModel(spec, str(p), manifest)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[-40:].strip("-") or "model"


def model_id(model: ResolvedModel, generation: GenerationSettings) -> str:
    """Images folder id: the same model and generation settings -> the same stored images."""
    key = json.dumps({"model": model.load, "generation": generation.to_dict()}, sort_keys=True)
    return f"{_slug(model.load)}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


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
    models = {"model": resolve_model(req.model)}
    if req.baseline:
        models["baseline"] = resolve_model(req.baseline, "baseline")
    suite = build_suite(req, models["model"])
    scorers = _scorers(req, models)
    reference = _reference_files(req)
    model_ids = {t: model_id(m, req.generation) for t, m in models.items()}
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


def _absolute_output(output: str) -> str:
    # Workers may run in another working directory: give them an absolute local path.
    return output if "://" in output else str(Path(output).expanduser().resolve())


def run_eval(req: EvalRequest) -> dict[str, Any]:
    """Run an evaluation; returns the report. Raises MaceError on bad input."""
    timer = Timer()
    with timer.stage("prepare"):
        p = prepare(req)
    storage = open_storage(req.output, s3_endpoint=req.s3_endpoint)
    layout = EvalLayout(p.eval_id)
    log.info(
        "eval %s: %s suite, %d images per model, models: %s",
        p.eval_id,
        p.suite.name,
        len(p.suite.prompts),
        ", ".join(f"{t}={m.spec}" for t, m in p.models.items()),
    )
    write_json(
        storage,
        layout.prompts,
        {"suite": p.suite.name, "source": p.suite.source, "prompts": [x.to_dict() for x in p.suite.prompts]},
    )
    with backend_for(req.executor, req.address) as backend:
        return EvalDriver(backend, p, storage, layout, timer).run()


class EvalDriver:
    """Stages 2-3 over a pool of evaluation workers."""

    def __init__(
        self, backend: Any, p: PreparedEval, storage: Storage, layout: EvalLayout, timer: Timer
    ) -> None:
        self.backend, self.p, self.storage, self.layout, self.timer = backend, p, storage, layout, timer
        req = p.request
        self.spec = EvalSpec(
            eval_id=p.eval_id,
            suite=p.suite.name,
            classes=p.suite.classes,
            models={t: m.load for t, m in p.models.items()},
            model_ids=p.model_ids,
            output=_absolute_output(req.output),
            generation=req.generation,
            scorers=p.scorers,
            s3_endpoint=req.s3_endpoint,
            device=req.device,
            resume=req.resume,
            under_ray=backend.name == "ray",
            progress=req.progress,
        )
        self.session = f"{p.eval_id[:8]}-{uuid.uuid4().hex[:6]}"

    def worker_shape(self, n_jobs: int) -> tuple[int, Resources]:
        req = self.p.request
        return worker_shape(self.backend, req.workers, req.gpus_per_worker, n_jobs)

    def reference_key(self) -> str:
        """The cache key of the reference set's moments: its files (names, sizes) and the extractor."""
        files = [(f, Path(f).stat().st_size) for f in self.p.reference_files]
        sc = self.p.scorers
        if sc.fid_weights:
            extractor = {"fid_weights": [sc.fid_weights, Path(sc.fid_weights).stat().st_size]}
        else:
            extractor = {"clip": sc.clip}
        blob = json.dumps({"files": files, "extractor": extractor}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def jobs(
        self, cached_reference: bool
    ) -> tuple[list[Job], dict[str, dict[int, ShardScores]], dict[int, FeatureMoments]]:
        """One job per (model, shard of prompts) and per shard of reference images (unless cached)."""
        size = self.p.request.shard_size
        prompts = list(self.p.suite.prompts)
        results: dict[str, dict[int, ShardScores]] = {t: {} for t in self.p.models}
        reference: dict[int, FeatureMoments] = {}
        files = [] if cached_reference else self.p.reference_files
        total = len(prompts) * len(self.p.models) + len(files)
        progress = {"done": 0}

        def tick(n: int, label: str) -> None:
            progress["done"] += n
            log.info("eval: %d/%d images done (%s)", progress["done"], total, label)

        def keep(tag: str, start: int):
            def on_done(job: Job, result: ShardScores) -> None:
                results[tag][start] = result
                tick(len(job.args[1]), job.label)

            return on_done

        def keep_reference(start: int):
            def on_done(job: Job, result: FeatureMoments) -> None:
                reference[start] = result
                tick(len(job.args[0]), job.label)

            return on_done

        jobs = []
        for tag in [t for t in MODEL_TAGS if t in self.p.models]:
            for start in range(0, len(prompts), size):
                shard = prompts[start : start + size]
                label = f"{tag}:{self.p.suite.name}[{start}:{start + len(shard)}]"
                jobs.append(Job("process", (tag, shard), label, keep(tag, start)))
        for start in range(0, len(files), size):
            label = f"reference[{start}:{start + size}]"
            jobs.append(
                Job("reference_features", (files[start : start + size],), label, keep_reference(start))
            )
        return jobs, results, reference

    def run(self) -> dict[str, Any]:
        ref_key = reference_cache_key(self.reference_key()) if self.p.reference_files else None
        cached = ref_key is not None and self.p.request.resume and self.storage.exists(ref_key)
        jobs, results, reference = self.jobs(cached)
        n_workers, resources = self.worker_shape(len(jobs))
        log.info("eval workers: %d x %s (%s executor)", n_workers, resources, self.backend.name)
        self.backend.request_resources([resources.bundle()] * n_workers)
        pool = WorkerPool(
            self.backend,
            self.spec,
            resources,
            n_workers,
            self.storage,
            self.session,
            worker_cls=EvalWorker,
            name_prefix="mace-eval",
        )
        try:
            with self.timer.stage("generate_and_score"):
                pool.run(jobs)
        finally:
            pool.shutdown()
            self.backend.request_resources([])
        ref = None
        if cached:
            ref = moments_from_bytes(self.storage.read_bytes(ref_key), f"{self.storage.url}/{ref_key}")
            log.info("FID reference moments reused from %s", ref_key)
        elif ref_key is not None:
            ref = _sum_moments([reference[k] for k in sorted(reference)])
            self.storage.write_bytes(
                ref_key, moments_bytes(ref, {"folder": self.p.request.reference_images or ""})
            )
        with self.timer.stage("report"):
            return self.report(results, ref, cached, pool)

    def report(
        self,
        results: dict[str, dict[int, ShardScores]],
        ref: FeatureMoments | None,
        ref_cached: bool,
        pool: WorkerPool,
    ) -> dict[str, Any]:
        p, storage, layout = self.p, self.storage, self.layout
        suite = p.suite.name
        models: dict[str, Any] = {}
        moments: dict[str, FeatureMoments | None] = {}
        notes = list(p.notes)
        for tag, m in p.models.items():
            shards = [results[tag][k] for k in sorted(results[tag])]  # prompt order: deterministic sums
            scores: list[ImageScore] = [s for sh in shards for s in sh.scores]
            moments[tag] = _sum_moments([sh.moments for sh in shards if sh.moments is not None])
            feature = _feature_name(p.scorers) if suite == "coco" else None
            summary = summarise(suite, scores, moments[tag], ref, feature)
            models[tag] = {
                "name": m.spec,
                "loaded_from": m.load,
                "model_id": p.model_ids[tag],
                "images_prefix": images_prefix(p.model_ids[tag], suite),
                **summary,
            }
            write_json(storage, layout.scores(tag), [s.to_dict() for s in scores])
        comparison: dict[str, Any] = {}
        if suite == "coco" and moments.get("model") is not None and moments.get("baseline") is not None:
            comparison["fid_vs_baseline"] = fid(moments["model"], moments["baseline"])
        if suite == "coco":
            dim = next((m.mean.shape[0] for m in moments.values() if m is not None), 0)
            n = min((m.n for m in moments.values() if m is not None), default=0)
            if n and n < dim:
                notes.append(
                    f"FID from {n} images per model, fewer than the {dim} feature dimensions: biased"
                )
        report: dict[str, Any] = {
            "eval_id": p.eval_id,
            "status": "complete",
            "suite": suite,
            "models": models,
            "comparison": comparison,
            "suite_info": {
                "images": len(p.suite.prompts),  # per model
                "prompts": len({x.prompt for x in p.suite.prompts}),
                "source": p.suite.source,
                "erased": list(p.suite.erased),
                "retained": list(p.suite.retained),
                "classes": list(p.suite.classes) if suite == "objects" else [],
                "images_per_prompt": p.request.images_per_prompt
                or (len(p.request.seeds) if p.request.seeds else DEFAULT_IMAGES_PER_PROMPT[suite]),
                "seeds": list(p.request.seeds)
                if p.request.seeds
                else f"derived from base seed {p.request.seed}",
                "notes": list(p.suite.notes),
                "reference_images": len(p.reference_files),
                "reference_moments_cached": ref_cached,
            },
            "notes": notes,
            "scorers": p.scorers.to_dict(),
            "generation": p.request.generation.to_dict(),
            "executor": self.backend.name,
            "workers": pool.summary(),
            "versions": versions(),
            "seconds": self.timer.seconds,
        }
        plots = report_plots(report)
        report["output"] = {
            "root": f"{storage.url}/{layout.root}",
            "report": layout.report,
            "summary": layout.summary,
            "prompts": layout.prompts,
            "scores": {t: layout.scores(t) for t in models},
            "plots": sorted(plots),
        }
        for name, png in plots.items():
            storage.write_bytes(layout.plot(name), png)
        storage.write_bytes(layout.summary, markdown_summary(report).encode())
        write_json(storage, layout.report, report)
        return report


def _feature_name(scorers: ScorerSettings) -> str:
    return "inception" if scorers.fid_weights else "clip"


def _sum_moments(parts: list[FeatureMoments]) -> FeatureMoments | None:
    if not parts:
        return None
    total = parts[0]
    for m in parts[1:]:
        total = total + m
    return total
