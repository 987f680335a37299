"""The evaluation worker, a plain class: the local executor instantiates it, Ray runs it as an actor.

It loads the scorers of its suite once, and each evaluated pipeline once (lazily, on its first
shard), then serves many shards: generate the shard's images from their fixed seeds (reusing
any already stored), write them as PNG, score them. No maths here: mace_core.evaluation does.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mace_core.evaluation.errors import EvalInputError
from mace_core.evaluation.fid import FeatureMoments
from mace_core.evaluation.generation import generate_eval_images
from mace_core.evaluation.scoring import ScorerSettings, ShardScores, SuiteScorer
from mace_core.evaluation.settings import GenerationSettings
from mace_core.evaluation.suites import EvalPrompt
from mace_core.imageio import png_bytes, read_png
from mace_core.models import load_pipeline
from mace_ray.engine.progress import StageProgress
from mace_ray.engine.requests import DEFAULT_OUTPUT
from mace_ray.engine.worker import PoolWorker
from mace_ray.eval.layout import image_key
from mace_ray.storage.resolve import Sources

log = logging.getLogger("mace_ray")


@dataclass(frozen=True)
class EvalSpec:
    """What every evaluation worker needs to know; small and picklable."""

    eval_id: str
    suite: str
    classes: tuple[str, ...]  # the suite's label set (zero-shot classes, celebrity names)
    models: dict[str, str] = field(default_factory=dict)  # tag -> model to load
    model_ids: dict[str, str] = field(default_factory=dict)  # tag -> images folder id
    output: str = DEFAULT_OUTPUT
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    scorers: ScorerSettings = field(default_factory=ScorerSettings)
    s3_endpoint: str | None = None
    device: str | None = None
    resume: bool = True  # reuse stored images
    metrics: str = "none"  # WorkerPool's metrics kind (evaluations count no concepts)
    progress: bool = True  # progress bars and lines while a shard's images are made
    under_ray: bool = False  # bars through Ray's tqdm_ray (drawn by the driver)

    @property
    def run_id(self) -> str:  # WorkerPool labels its metrics with it
        return self.eval_id


class EvalWorker(PoolWorker[EvalSpec]):
    def __init__(self, spec: EvalSpec, name: str) -> None:
        super().__init__(spec, name)
        self.pipes: dict[str, object] = {}

    def load(self) -> dict[str, Any]:
        """The suite's scorers, once (pipelines load on their first shard)."""
        spec = self.spec
        self.scorer = SuiteScorer(spec.suite, spec.classes, spec.scorers, self.device)
        self.sources = Sources(spec.s3_endpoint)  # its models, one S3 client per bucket
        return {}

    def _pipe(self, tag: str):
        if tag not in self.pipes:
            half = self.spec.generation.precision == "auto" and self.device.type == "cuda"
            # An s3:// model: its copy in the model cache, fetched (and verified) once per content.
            local = self.sources.pipeline(self.spec.models[tag])
            pipe = load_pipeline(local, torch.float16 if half else torch.float32)
            self.pipes[tag] = pipe.to(self.device)
        return self.pipes[tag]

    def score_shard(self, tag: str, prompts: list[EvalPrompt]) -> ShardScores:
        """Images of ``prompts`` with model ``tag`` (stored ones reused), written as PNG, then scored."""
        t = time.perf_counter()
        keys = [image_key(self.spec.model_ids[tag], self.spec.suite, p.id) for p in prompts]
        pngs: list[bytes | None] = [
            self.storage.read_bytes(k) if self.spec.resume and self.storage.exists(k) else None for k in keys
        ]
        todo = [i for i, b in enumerate(pngs) if b is None]
        if todo:
            # Per-image seeds: rendering only the missing images gives the same images.
            label = f"eval {tag}[{prompts[0].id}+{len(prompts) - 1}]"
            shown = StageProgress(label, self.spec.progress, under_ray=self.spec.under_ray)
            try:
                pipe, subset = self._pipe(tag), [prompts[i] for i in todo]
                new = generate_eval_images(pipe, subset, self.spec.generation, shown.update)
            finally:
                shown.close()
            for i, im in zip(todo, new, strict=True):
                pngs[i] = png_bytes(im)
                self.storage.write_bytes(keys[i], pngs[i])
        images = [read_png(b, keys[i]) for i, b in enumerate(pngs)]
        scores = self.scorer.score(prompts, images, pngs)
        log.debug(
            "%s: %d images (%d new) in %.1fs", self.name, len(prompts), len(todo), time.perf_counter() - t
        )
        return scores

    def reference_features(self, paths: list[str]) -> FeatureMoments:
        """FID feature moments of reference images read from local paths (e.g. MS-COCO val)."""
        from PIL import Image

        images: list[np.ndarray] = []
        for path in paths:
            try:
                with Image.open(Path(path)) as im:
                    images.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
            except (OSError, ValueError) as e:
                raise EvalInputError(f"reference image {path!r} cannot be read: {e}") from None
        return self.scorer.feature_moments(images)

    def teardown(self) -> None:
        self.pipes.clear()
        self.scorer = None
        super().teardown()
