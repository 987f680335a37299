"""The GPU worker of an erase run (``ConceptWorker``), a plain class, and the spec every
worker of the run is built from (``RunSpec``).

``ConceptWorker`` holds a pipeline (loaded once) and does the per-concept work: images,
masks, LoRA training, the erasure report, and finally writing the model (the text
statistics run on CPU workers, ``mace_ray.erase.text_worker``; the sums and solves on the
statistics actor, ``mace_ray.erase.stats_worker``). It reads its inputs from and writes
its outputs to storage, so it can be replaced at any time. The local executor
instantiates it directly; the Ray executor runs it as an actor. It does no maths itself:
mace_core does.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch

from mace_core.cfr import apply_cfr
from mace_core.checkpoints import erasure_bytes
from mace_core.concept_job import ConceptBatchWorker
from mace_core.concepts import Concept
from mace_core.erased_folder import ErasedFolder, write_erased_folder
from mace_core.erasure_report import (
    KVProjection,
    attention_mass,
    kv_drift,
    kv_gaps,
    lora_relative_norm,
)
from mace_core.families import family_of_pipeline
from mace_core.families.model_index import TINY_MODEL
from mace_core.fingerprint import expect_fingerprint, file_sha256, pipeline_fingerprint
from mace_core.masking import load_masker
from mace_core.models import load_pipeline, pipeline_projections
from mace_core.progress import no_progress
from mace_core.prompts import heldout_captions, prompt_pairs
from mace_core.source_folder import folder_files, source_folder
from mace_ray.engine.progress import StageProgress
from mace_ray.engine.worker import PoolWorker
from mace_ray.erase import artefacts
from mace_ray.erase.locate import local_masks
from mace_ray.erase.spec import RunSpec, load_checked
from mace_ray.storage.resolve import Sources

log = logging.getLogger("mace_ray")

T = TypeVar("T")


class ConceptWorker(PoolWorker[RunSpec]):
    """Per-concept work on one device; loads the pipeline once and serves many batches."""

    def load(self) -> dict[str, Any]:
        """The pipeline and the masker, once; adds the batch plan to where this worker runs."""
        spec = self.spec
        self.layout = spec.layout
        self.sources = Sources(spec.s3_endpoint)  # the model's inputs, one S3 client per bucket
        self.pipe = self._load_checked()
        # The projections MACE edits (attn2 to_k / to_v, or an MMDiT's context_embedder and
        # pooled projection) and their original weights, as the closed forms take them: in
        # fp32, before the batch worker moves the pipeline (and may hold it in half precision).
        self.projections = pipeline_projections(self.pipe)
        self.original = self.projections.weights()
        # A closed-form-only run makes no masks: no detector or segmenter to load (or lack).
        # An s3:// detector or segmenter is fetched into this node's model cache first.
        self.masker = (
            load_masker(
                local_masks(spec.settings.masks, spec.s3_endpoint), self.device, tiny=spec.model == TINY_MODEL
            )
            if spec.method == "mace"
            else None
        )
        # Refined weights come with set_cfr; images and masks need only the original model.
        self.batch_worker = ConceptBatchWorker(
            self.pipe, spec.settings, self.device, self.original, None, masker=self.masker
        )
        self.encoder = self.batch_worker.encoder
        # With the models loaded, what is left of the GPU's memory sets the batch sizes.
        self.plan = self.batch_worker.plan()
        return {"batch_plan": self.plan.to_dict()}

    def _load_checked(self) -> Any:
        """The run's pipeline (on the CPU, fp32), refused if its files are not the ones the
        run fingerprinted."""
        spec = self.spec
        if spec.model == TINY_MODEL:  # built, not read: hash what was built
            pipe = load_pipeline(TINY_MODEL)
            if spec.model_fingerprint:
                expect_fingerprint(spec.model, spec.model_fingerprint, pipeline_fingerprint(pipe))
            return pipe

        def load() -> Any:
            return load_pipeline(self.sources.pipeline(spec.model))

        return load_checked(spec, self.sources, load)

    def batch_plan(self) -> dict[str, Any]:
        """Concepts per batch and images per diffusion batch this worker's memory holds."""
        return self.plan.to_dict()

    # ------------------------------------------------------------ training

    def original_weights(self) -> dict[str, torch.Tensor]:
        return self.original

    def set_cfr(self, M: torch.Tensor) -> None:
        """W' = W M (Eq. 2), the weights the LoRAs train on."""
        self.batch_worker.refined = apply_cfr(self.original, M)

    def _pending(self, concepts: list[Concept]) -> list[Concept]:
        done = artefacts.done_slugs(self.storage, self.layout)
        return [c for c in concepts if c.slug not in done]

    @contextmanager
    def _progress(self, stage: str, concepts: list[Concept]) -> Iterator[None]:
        """Progress bars for one job (image steps, masks, training steps), closed after it."""
        label = f"{stage}[{concepts[0].slug}+{len(concepts) - 1}]" if concepts else stage
        shown = StageProgress(label, self.spec.progress, under_ray=self.spec.metrics == "ray")
        self.batch_worker.progress = shown.update
        try:
            yield
        finally:
            shown.close()
            self.batch_worker.progress = no_progress

    def prepare_data(self, concepts: list[Concept]) -> list[str]:
        """Images and masks of a batch, stored; runs before CFR is solved. Returns new slugs."""
        spec = self.spec
        todo = [c for c in self._pending(concepts) if not self.storage.exists(spec.data_layout(c).marker)]
        if not todo:
            return []
        with self._progress("data", todo):
            for d in self.batch_worker.data(todo):
                artefacts.write_data(self.storage, spec.data_layout(d.concept), d)
        return [c.slug for c in todo]

    def train(self, concepts: list[Concept]) -> list[str]:
        """The LoRAs of a batch; each concept's DONE marker written last.

        Concepts already DONE are skipped; stored images and masks are used, and any
        concept without them gets them here first (same seeds, same images).
        """
        if self.batch_worker.refined is None:
            raise RuntimeError("set_cfr must be called before train")
        todo = self._pending(concepts)
        if not todo:
            return []
        spec = self.spec
        stored = {c.slug: artefacts.read_data(self.storage, spec.data_layout(c), c) for c in todo}
        missing = [c for c in todo if stored[c.slug] is None]
        with self._progress("train", todo):
            for d in self.batch_worker.data(missing) if missing else []:
                artefacts.write_data(self.storage, spec.data_layout(d.concept), d)
                stored[d.concept.slug] = d
            arts = self.batch_worker.finish([stored[c.slug] for c in todo])
        for art in arts:
            art.notes["where"] = self.where
            artefacts.write_result(self.storage, self.layout, art)
        return [a.concept.slug for a in arts]

    # ------------------------------------------------------------ output

    def write_final(self, fused: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, Any]:
        """The erased diffusers folder (visible at once), the compact erasure file, and the
        compact file of the CFR-refined weights (what each concept's LoRA applies to).

        The folder is the source model's with only the edited component's edited tensors
        replaced (``mace_core.erased_folder``), never this worker's loaded pipeline saved
        again: its scheduler (DPM-Solver after generating), dtype and missing safety checker
        stay out of it. Returns ``outputs``, the SHA-256 of every file written by storage key
        (the run records them, and a rerun of a complete run checks them before it says
        "already complete"), and ``pipeline``: which files were copied, rewritten and left out
        (the driver logs and reports those).
        """
        component = family_of_pipeline(self.pipe).edited_component
        fused = self.projections.component_tensors(fused)  # the component's own tensor shapes
        sums: dict[str, str] = {}
        with tempfile.TemporaryDirectory(prefix="mace-final-") as tmp:
            folder = Path(tmp) / "pipeline"
            written = self._write_erased(Path(tmp) / "source", folder, component, fused)
            for rel in folder_files(folder):
                sums[f"{self.layout.final_pipeline}/{rel}"] = file_sha256(folder / rel)
            self.storage.put_dir(folder, self.layout.final_pipeline)
        meta = {**metadata, "component": component}
        data = erasure_bytes(fused, meta)
        self.storage.write_bytes(self.layout.erasure, data)
        sums[self.layout.erasure] = artefacts.sha256(data)
        if self.batch_worker.refined is not None:  # a LoRA of the run loads onto these weights
            refined = self.projections.component_tensors(self.batch_worker.refined)
            cfr = erasure_bytes(refined, {**meta, "weights": "cfr"})
            self.storage.write_bytes(self.layout.cfr_erasure, cfr)
            sums[self.layout.cfr_erasure] = artefacts.sha256(cfr)
        return {"outputs": sums, "pipeline": written.to_dict()}

    def _write_erased(
        self, scratch: Path, folder: Path, component: str, fused: dict[str, torch.Tensor]
    ) -> ErasedFolder:
        """The source's files with ``fused`` in place; a source whose files are not the ones the
        run fingerprinted (checked before and after copying them) is refused."""
        spec = self.spec

        def write() -> ErasedFolder:
            # An s3:// model: the model cache's copy, fetched when the pipeline was loaded.
            source = source_folder(self.sources.pipeline(spec.model), scratch)
            return write_erased_folder(source, folder, component, fused, "the run's erasure")

        # The tiny model is built from code, saved as its own source: nothing to check.
        return write() if spec.model == TINY_MODEL else load_checked(spec, self.sources, write)

    # ------------------------------------------------------------ erasure report

    def _projections(self, fused: dict[str, torch.Tensor], group: str = "context") -> dict[str, KVProjection]:
        """The original, CFR and final weights of one group of edited projections: "context"
        (attn2 to_k / to_v, context_embedder: the headline figures) or "pooled" (an MMDiT's
        pooled text projection, reported on its own)."""
        if self.batch_worker.refined is None:
            raise RuntimeError("set_cfr must be called before the erasure report")
        keys = self.projections.group(group)
        weights = {"original": self.original, "cfr": self.batch_worker.refined, "final": fused}
        return {name: KVProjection({k: w[k] for k in keys}, self.device) for name, w in weights.items()}

    def erasure_report(
        self, concepts: list[Concept], fused: dict[str, torch.Tensor]
    ) -> dict[str, dict[str, Any]]:
        """Per concept: residual after CFR and after fusion, attention mass in its masks for
        the original and the erased UNet (``mace_core.erasure_report``)."""
        kv = self._projections(fused)
        out: dict[str, dict[str, Any]] = {}
        for c in concepts:
            gap, residual = kv_gaps(self.encoder, c, kv["original"], {"cfr": kv["cfr"], "final": kv["final"]})
            train_pairs = prompt_pairs(c, self.spec.settings.prompts_per_concept)
            final = {"final": kv["final"]}
            gap_train, on_train = kv_gaps(self.encoder, c, kv["original"], final, train_pairs)
            entry: dict[str, Any] = {
                "residual_cfr": residual["cfr"],
                "residual": residual["final"],
                "residual_train": on_train["final"],
                "gap": gap,
                "gap_train": gap_train,
                "lora_relative_norm": None,
            }
            if self.projections.group("pooled"):
                pooled = self._projections(fused, "pooled")
                _, res = kv_gaps(
                    self.encoder, c, pooled["original"], {"cfr": pooled["cfr"], "final": pooled["final"]}
                )
                entry["residual_pooled_cfr"], entry["residual_pooled"] = res["cfr"], res["final"]
            mace = self.spec.method == "mace"
            if mace:
                lora = artefacts.read_lora(self.storage, self.layout, c.slug)
                entry["lora_relative_norm"] = lora_relative_norm(lora, self.original)
            data = artefacts.read_data(self.storage, self.spec.data_layout(c), c) if mace else None
            if data is None:
                entry["attention_mass"] = None
                entry["attention_mass_missing"] = (
                    "the concept's stored images or masks are incomplete"
                    if mace
                    else "a closed-form-only run makes no images or masks"
                )
            else:
                mass = attention_mass(
                    self.batch_worker.denoiser,
                    self.pipe.vae,
                    self.batch_worker.noise_scheduler,
                    self.encoder,
                    c,
                    data.images,
                    data.masks,
                    {"original": self.original, "erased": fused},
                    self.device,
                    seed=self.spec.settings.train.seed,
                )
                entry["attention_mass"] = mass
            out[c.slug] = entry
        return out

    def drift_report(self, fused: dict[str, torch.Tensor], retain_prompts: list[str]) -> dict[str, Any]:
        """Drift of held-out generic captions (and of the retained set's held-out prompts)
        after CFR and after fusion."""
        kv = self._projections(fused)
        captions = list(heldout_captions())
        out: dict[str, Any] = {
            "prior_drift_cfr": kv_drift(self.encoder, captions, kv["original"], kv["cfr"]),
            "prior_drift": kv_drift(self.encoder, captions, kv["original"], kv["final"]),
            "heldout_captions": len(captions),
        }
        if self.projections.group("pooled"):
            pooled = self._projections(fused, "pooled")
            out["prior_drift_pooled_cfr"] = kv_drift(
                self.encoder, captions, pooled["original"], pooled["cfr"]
            )
            out["prior_drift_pooled"] = kv_drift(self.encoder, captions, pooled["original"], pooled["final"])
        if retain_prompts:
            out["retain_drift_cfr"] = kv_drift(self.encoder, retain_prompts, kv["original"], kv["cfr"])
            out["retain_drift"] = kv_drift(self.encoder, retain_prompts, kv["original"], kv["final"])
            out["retain_prompts"] = len(retain_prompts)
        return out

    def teardown(self) -> None:
        self.batch_worker = None
        self.pipe = None
        self.masker = None
        super().teardown()
