"""The audit worker, a plain class: the local executor instantiates it, Ray runs it as an actor.

It loads the original and the audited pipeline once (and the image scorer), then serves
jobs: one attack on one concept, or a concept's plain-prompt baseline. A job's result JSON
is written last, with the checksums of the embeddings and images written before it: it is
the job's completion marker, and a job whose marker holds is not run again. No maths here:
mace_core.audit does it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from mace_core.audit.concepts import AuditConcept
from mace_core.audit.context import AuditModels
from mace_core.audit.embedding import AttackPrompt
from mace_core.audit.run import plain_measure, prompt_images, run_attack
from mace_core.audit.scoring import LeakScorer
from mace_core.audit.settings import AuditSettings
from mace_core.concepts import ConceptType
from mace_core.imageio import png_bytes
from mace_core.models import load_pipeline
from mace_core.sealed import sealed_bytes
from mace_ray.audit.layout import BASELINE, AuditLayout
from mace_ray.engine.progress import StageProgress
from mace_ray.engine.worker import PoolWorker
from mace_ray.erase import artefacts
from mace_ray.erase.layout import RunLayout
from mace_ray.storage.base import Storage, StorageError, read_json, write_json
from mace_ray.storage.open_store import open_storage
from mace_ray.storage.resolve import Sources

log = logging.getLogger("mace_ray")


@dataclass(frozen=True)
class AuditSpec:
    """What every audit worker needs to know; small and picklable."""

    audit_id: str
    model: str  # the audited pipeline, as load_pipeline takes it (or s3://)
    original: str
    output: str
    settings: AuditSettings
    budget_per_attack_s: float | None = None
    # The erase run whose stored images (made by the original model) concept inversion uses.
    run_output: str | None = None
    run_id: str | None = None
    explicit: bool = False  # some concept is explicit: load NudeNet
    clip: str | None = None  # the image scorer (resolved: tiny for tiny models)
    s3_endpoint: str | None = None
    device: str | None = None
    progress: bool = True
    under_ray: bool = False


def verified_result(storage: Storage, key: str) -> dict[str, Any] | None:
    """A job's stored result, if its marker exists and every file it lists matches its checksum."""
    if not storage.exists(key):
        return None
    try:
        rec = read_json(storage, key)
        for k, digest in (rec.get("sha256") or {}).items():
            if not storage.exists(k) or artefacts.sha256(storage.read_bytes(k)) != digest:
                log.warning("%s: %s is missing or altered; the job runs again", key, k)
                return None
    except (StorageError, AttributeError) as e:
        log.warning("%s is unreadable (%s); the job runs again", key, str(e)[:120])
        return None
    return rec


class AuditWorker(PoolWorker[AuditSpec]):
    def load(self) -> dict[str, Any]:
        """Both pipelines and the scorer, once."""
        spec = self.spec
        self.layout = AuditLayout(spec.audit_id)
        # fp32: the attacks differentiate through both models (generation may autocast).
        sources = Sources(spec.s3_endpoint)
        original = load_pipeline(sources.pipeline(spec.original)).to(self.device)
        erased = load_pipeline(sources.pipeline(spec.model)).to(self.device)
        self.models = AuditModels.of(original, erased, self.device)
        scoring = spec.settings.images > 0
        self.scorer = LeakScorer(spec.clip if scoring else None, self.device, scoring and spec.explicit)
        return {}

    # ------------------------------------------------------------ helpers

    def _shown(self, label: str) -> StageProgress:
        return StageProgress(label, self.spec.progress, under_ray=self.spec.under_ray)

    def _images(
        self, concept: AuditConcept, what: str, prompt: AttackPrompt, model: str, shown: StageProgress
    ) -> tuple[dict[str, Any], dict[str, str]]:
        """Images of ``prompt`` (stored as PNG) and their verdicts; (figures, checksums by key)."""
        n = self.spec.settings.images
        if n == 0:
            return {"leak_rate": None, "unavailable": "--images 0"}, {}
        ims = prompt_images(self.models, concept, prompt, self.spec.settings, model, progress=shown.update)
        pngs = [png_bytes(im) for im in ims]
        sums = {}
        for j, png in enumerate(pngs):
            key = self.layout.image(concept.slug, what, j)
            self.storage.write_bytes(key, png)
            sums[key] = artefacts.sha256(png)
        figures = self.scorer.score(concept.concept, ims, pngs).to_dict()
        return {**figures, "keys": list(sums)}, sums

    def _original_images(self, concept: AuditConcept, shown: StageProgress):
        """n -> the original model's images of the concept: the erase run's stored ones when
        it has them, else made now (with the audit's image seeds)."""
        source: dict[str, str] = {}

        def images(n: int) -> np.ndarray:
            spec = self.spec
            if spec.run_output and spec.run_id:
                stored = artefacts.run_data(
                    open_storage(spec.run_output, s3_endpoint=spec.s3_endpoint),
                    RunLayout(spec.run_id),
                    concept.concept,
                )
                if stored is not None and len(stored.images):
                    source["images_from"] = "erase run"
                    return stored.images
            source["images_from"] = "original model"
            text = AttackPrompt(concept.concept.text)
            return prompt_images(self.models, concept, text, spec.settings, "original", n, shown.update)

        return images, source

    # ------------------------------------------------------------ jobs

    def _job(
        self,
        concept: AuditConcept,
        job: str,
        work: Callable[[StageProgress], tuple[dict[str, Any], dict[str, str]]],
    ) -> dict[str, Any]:
        """One job's record: the stored one when its marker holds (marked reused), else what
        ``work`` finds (its figures, and the checksums of the files it wrote), written last
        as the job's marker."""
        key = self.layout.result(concept.slug, job)
        done = verified_result(self.storage, key)
        if done is not None:
            return {**done, "reused": True}
        shown = self._shown(f"{job}[{concept.slug}]")
        try:
            figures, sums = work(shown)
        finally:
            shown.close()
        rec = {
            "concept": concept.to_dict(),
            "slug": concept.slug,
            **figures,
            "sha256": sums,
            "where": self.where,
        }
        write_json(self.storage, key, rec)
        return rec

    def baseline(self, concept: AuditConcept) -> dict[str, Any]:
        """The concept's plain prompt: leak through the erased model; images of both models."""

        def work(shown: StageProgress) -> tuple[dict[str, Any], dict[str, str]]:
            plain = AttackPrompt(concept.concept.text)
            measure = plain_measure(self.models, concept)
            original, s1 = self._images(concept, "original", plain, "original", shown)
            erased, s2 = self._images(concept, "erased", plain, "erased", shown)
            return {"plain": measure.to_dict(), "images": {"original": original, "erased": erased}}, {
                **s1,
                **s2,
            }

        return self._job(concept, BASELINE, work)

    def attack(self, concept: AuditConcept, attack: str) -> dict[str, Any]:
        """One attack on one concept: its best prompt, measured; that prompt's images, scored."""

        def work(shown: StageProgress) -> tuple[dict[str, Any], dict[str, str]]:
            images_of, source = self._original_images(concept, shown)
            result = run_attack(
                self.models,
                concept,
                attack,
                self.spec.settings,
                self.spec.budget_per_attack_s,
                shown.update,
                images_of,
            )
            images, sums = self._images(concept, attack, result.prompt, "erased", shown)
            if result.prompt.embeddings is not None:
                data = sealed_bytes(
                    result.prompt.tensors(),  # one tensor per text encoder: embeddings, embeddings_2, ...
                    {"word": result.prompt.word, "concept": concept.concept.text, "attack": attack},
                )
                emb = self.layout.embedding(concept.slug, attack)
                self.storage.write_bytes(emb, data)
                sums[emb] = artefacts.sha256(data)
            details = {**result.details, **source}
            return {"result": {**result.to_dict(), "details": details}, "images": images}, sums

        return self._job(concept, attack, work)

    def teardown(self) -> None:
        self.models = None
        self.scorer = None
        super().teardown()


def has_explicit(concepts: list[AuditConcept]) -> bool:
    return any(c.concept.type == ConceptType.EXPLICIT for c in concepts)
