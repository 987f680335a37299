"""The stages of an evaluation (after ``prepare``), as data, and the state they share.

Images are generated and scored on GPU workers (one job per model and shard of prompts,
stored images reused), the FID reference moments come from the cache or from CPU-side
feature extraction on the same workers, and the driver writes the report.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from mace_core.evaluation.fid import FeatureMoments, fid, moments_bytes, moments_from_bytes, reference_key
from mace_core.evaluation.plots import report_plots
from mace_core.evaluation.scoring import ImageScore, ScorerSettings, ShardScores, summarise
from mace_core.evaluation.suites import DEFAULT_IMAGES_PER_PROMPT
from mace_core.evaluation.summary import markdown_summary
from mace_ray.engine.backend import Backend
from mace_ray.engine.declared import Declared, given, stored
from mace_ray.engine.jobs import Job
from mace_ray.engine.pool import WorkerPool
from mace_ray.engine.provenance import versions
from mace_ray.engine.report_files import write_report_files
from mace_ray.engine.stage_workers import StageWorkers
from mace_ray.engine.stages import Placement, Stage, Timer, write_report
from mace_ray.eval.jobs import ReferenceFeatures, ScoreShard
from mace_ray.eval.layout import EvalLayout, image_key, images_prefix, reference_cache_key
from mace_ray.eval.worker import EvalSpec, EvalWorker
from mace_ray.storage.base import Storage, write_json
from mace_ray.storage.open_store import absolute_output

log = logging.getLogger("mace_ray")

MODEL_TAGS = ("baseline", "model")  # print order: the original first


class EvalRun:
    """The state the stages of one evaluation share."""

    def __init__(self, backend: Backend, p: Any, storage: Storage, layout: EvalLayout, timer: Timer) -> None:
        # p: mace_ray.eval.driver.PreparedEval (not imported: evaluate imports this module)
        self.backend, self.p, self.storage, self.layout, self.timer = backend, p, storage, layout, timer
        req = p.request
        self.spec = EvalSpec(
            eval_id=p.eval_id,
            suite=p.suite.name,
            classes=p.suite.classes,
            models={t: m.load for t, m in p.models.items()},
            model_ids=p.model_ids,
            output=absolute_output(req.output),
            generation=req.generation,
            scorers=p.scorers,
            resume=req.resume,
            under_ray=backend.name == "ray",
            **req.for_workers(),
        )
        self.session = f"{p.eval_id[:8]}-{uuid.uuid4().hex[:6]}"
        workers = {Placement.GPU: (EvalWorker, "mace-eval")}
        self.workers = StageWorkers(backend, self.spec, workers, req, self.session, p.eval_id)
        self.ref_key: str | None = None
        self.ref_cached = False
        self.ref: FeatureMoments | None = None
        self.results: dict[str, dict[int, ShardScores]] = {}
        self.reference: dict[int, FeatureMoments] = {}
        self.report: dict[str, Any] = {}

    @property
    def pool(self) -> WorkerPool | None:
        """The GPU workers' pool once started, kept for the report's summary."""
        return self.workers.built.get(Placement.GPU)

    def shards(self, n: int) -> int:
        """How many jobs ``n`` prompts or reference images make."""
        return len(range(0, n, self.p.request.shard_size))

    def reference_key(self) -> str:
        """The cache key of the reference set's moments: its images' and the extractor's content."""
        sc = self.p.scorers
        if sc.fid_weights:
            return reference_key(self.p.reference_files, "inception", sc.fid_weights)
        return reference_key(self.p.reference_files, f"clip:{sc.clip}")

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
            def on_done(job: ScoreShard, result: ShardScores) -> None:
                results[tag][start] = result
                tick(len(job.prompts), job.label)

            return on_done

        def keep_reference(start: int):
            def on_done(job: ReferenceFeatures, result: FeatureMoments) -> None:
                reference[start] = result
                tick(len(job.paths), job.label)

            return on_done

        jobs: list[Job] = []
        for tag in [t for t in MODEL_TAGS if t in self.p.models]:
            for start in range(0, len(prompts), size):
                shard = prompts[start : start + size]
                label = f"{tag}:{self.p.suite.name}[{start}:{start + len(shard)}]"
                jobs.append(ScoreShard(tag, shard, label=label, on_done=keep(tag, start)))
        for start in range(0, len(files), size):
            label = f"reference[{start}:{start + size}]"
            paths = files[start : start + size]
            jobs.append(ReferenceFeatures(paths, label=label, on_done=keep_reference(start)))
        return jobs, results, reference

    def write_report(self) -> dict[str, Any]:
        p, storage, layout = self.p, self.storage, self.layout
        results, ref, ref_cached, pool = self.results, self.ref, self.ref_cached, self.pool
        assert pool is not None
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
        return write_report_files(
            storage,
            layout,
            report,
            report_plots,
            markdown_summary,
            prompts=layout.prompts,
            scores={t: layout.scores(t) for t in models},
        )


def _feature_name(scorers: ScorerSettings) -> str:
    return "inception" if scorers.fid_weights else "clip"


def _sum_moments(parts: list[FeatureMoments]) -> FeatureMoments | None:
    if not parts:
        return None
    total = parts[0]
    for m in parts[1:]:
        total = total + m
    return total


def generate_and_score(run: EvalRun) -> None:
    run.ref_key = reference_cache_key(run.reference_key()) if run.p.reference_files else None
    run.ref_cached = run.ref_key is not None and run.p.request.resume and run.storage.exists(run.ref_key)
    jobs, run.results, run.reference = run.jobs(run.ref_cached)
    run.workers.run(jobs)


def reference_moments(run: EvalRun) -> None:
    """The FID reference set's feature moments: from the cache, or summed and cached."""
    key = run.ref_key
    if key is None:
        return
    if run.ref_cached:
        run.ref = moments_from_bytes(run.storage.read_bytes(key), f"{run.storage.url}/{key}")
        log.info("FID reference moments reused from %s", key)
        return
    run.ref = _sum_moments([run.reference[k] for k in sorted(run.reference)])
    assert run.ref is not None
    run.storage.write_bytes(key, moments_bytes(run.ref, {"folder": run.p.request.reference_images or ""}))


def eval_images(run: EvalRun) -> list[str]:
    suite = run.p.suite
    return [image_key(run.p.model_ids[t], suite.name, x.id) for t in run.p.models for x in suite.prompts]


def reference_shards(run: EvalRun) -> list[str]:
    """The reference images' moments, unless cached: one per shard of images."""
    if run.ref_key is None or run.ref_cached or len(run.reference) == run.shards(len(run.p.reference_files)):
        return []
    return ["the reference images' feature moments"]


def scored_models(run: EvalRun) -> list[str]:
    """Models with a shard of prompts not scored."""
    n = run.shards(len(run.p.suite.prompts))
    return [f"the scores of model {t!r}" for t in run.p.models if len(run.results.get(t, {})) < n]


EVAL_STAGES: tuple[Stage[EvalRun], ...] = (
    Stage(
        "generate_and_score",
        Placement.GPU,
        reads=given("the models, the suite's prompts, reference images (coco) (checked by prepare)"),
        writes="evals/images/<model id>/<suite>/<prompt id>.png",
        marker=stored("each image (reused unless --no-resume)", eval_images),
        run=generate_and_score,
    ),
    Stage(
        "reference_moments",
        Placement.DRIVER,
        reads=Declared(
            "per-shard feature moments of the reference images, or the cached moments",
            lambda run: [run.ref_key] if run.ref_key and run.ref_cached else [],
            reference_shards,
        ),
        writes="evals/cache/fid-reference/<key>.safetensors",
        marker=stored(
            "the cached moments of the same files and extractor",
            lambda run: [run.ref_key] if run.ref_key else [],
        ),
        run=reference_moments,
    ),
    Stage(
        "report",
        Placement.DRIVER,
        reads=Declared("per-image scores of every model", held=scored_models),
        writes="evals/<eval id>/report.json, summary.md, scores, plots",
        marker=stored(
            "report.json, summary.md and scores (written again on a rerun: seconds)",
            lambda run: [
                run.layout.report,
                run.layout.summary,
                *(run.layout.scores(t) for t in run.p.models),
            ],
        ),
        run=write_report,
    ),
)
