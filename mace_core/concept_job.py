"""One concept batch's work (MACE Stage 2): images, masks, LoRA training.

``ConceptBatchWorker`` loads nothing itself: it is handed a pipeline once and then
processes many batches, on one machine or inside a Ray actor alike. It returns plain
artefacts; writing them anywhere is the caller's business.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mace_core.batching import BatchPlan, halve_on_oom, plan_batches, shrink_on_oom
from mace_core.concepts import Concept
from mace_core.datagen import generate_images, image_size, images_to_tensor
from mace_core.families import family_of_pipeline
from mace_core.lora import LoraFactors
from mace_core.masking import Masker
from mace_core.masks import whole_image_masks
from mace_core.models import pipeline_prompt_encoder
from mace_core.progress import Progress, no_progress
from mace_core.projections import Projections
from mace_core.prompts import concept_prompts
from mace_core.settings import TYPE_DEFAULTS, EraseSettings, ResolvedTrain
from mace_core.train import TrainJob, train_loras


@dataclass
class ConceptData:
    """A concept's training data: images of the original model and their masks.

    It needs no CFR result, so it can be made while the closed form is being solved.
    """

    concept: Concept
    images: np.ndarray  # uint8 (N, H, W, 3)
    masks: np.ndarray  # bool (N, H, W)
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass
class ConceptArtefacts:
    """Everything a concept's DONE marker vouches for (the text statistics are separate)."""

    concept: Concept
    images: np.ndarray  # uint8 (N, H, W, 3)
    masks: np.ndarray  # bool (N, H, W)
    lora: LoraFactors
    losses: list[float]
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass(eq=False)  # a worker is itself, not its settings
class ConceptBatchWorker:
    """Generation (original weights W), masks, and LoRA training (refined weights W') for batches.

    ``original`` and ``refined`` are statistics weights of the family's edited projections
    (``mace_core.projections``), fp32. ``refined``: W' = W M; None until CFR is solved (images
    and masks do not need it). The pipeline is moved to ``device`` here; under ``--precision
    auto`` on a GPU a family's ``half_weights`` denoiser is held in its half dtype (take
    ``original`` before).
    ``masker``: from ``mace_core.masking.load_masker``, loaded once per worker; None means
    whole-image masks for every concept. ``max_batch_images``: at most this many images
    per diffusion batch, ``concepts_per_batch``: at most this many LoRAs per UNet batch
    (GPU memory; None: no limit; ``plan`` picks both from free memory). Neither changes
    any result, so a batch that runs out of memory is split and retried, and the smaller
    size is kept for the next batches.
    """

    pipe: Any = field(repr=False)  # the family's diffusers pipeline
    settings: EraseSettings
    device: torch.device
    original: dict[str, torch.Tensor] = field(repr=False)
    refined: dict[str, torch.Tensor] | None = field(repr=False)
    masker: Masker | None = None
    max_batch_images: int | None = None
    concepts_per_batch: int | None = None
    progress: Progress = no_progress
    # From the pipeline: its prompt encoder, denoiser, edited projections and the training
    # noise schedule (a DDPM scheduler for SD, ``mace_core.noise.FlowSchedule`` for an MMDiT).
    encoder: Any = field(init=False, repr=False)
    denoiser: Any = field(init=False, repr=False)
    projections: Projections = field(init=False, repr=False)
    noise_scheduler: Any = field(init=False, repr=False)
    half_dtype: torch.dtype = field(init=False, repr=False)  # generation's autocast on GPUs

    def __post_init__(self) -> None:
        family = family_of_pipeline(self.pipe)
        self.half_dtype = family.half_dtype
        self.denoiser = family.denoiser(self.pipe)
        # Half-precision frozen weights are cast before the pipeline moves, so the GPU never
        # holds them in fp32; the text encoders and the VAE stay fp32 (the conditioning the
        # statistics are made of). ``original``, the closed forms' W, was taken in fp32.
        if self.mixed_precision and family.half_weights:
            self.denoiser.to(self.half_dtype)
        self.pipe.to(self.device)
        self.encoder = pipeline_prompt_encoder(self.pipe, self.device)
        self.projections = family.edited_projections(self.denoiser)
        self.noise_scheduler = family.training_schedule(self.pipe)

    @property
    def mixed_precision(self) -> bool:
        return self.settings.precision == "auto" and self.device.type == "cuda"

    def plan(self) -> BatchPlan:
        """Batch sizes from the device's free memory, once the models are loaded.

        This worker adopts the images per diffusion batch; the concepts per batch are the
        caller's to hand out (``mace-ray erase --concepts-per-batch auto``). A batch the
        caller makes bigger than what fits is split when it runs out of memory.
        """
        latent = image_size(self.pipe, self.settings.data) // self.pipe.vae_scale_factor
        plan = plan_batches(self.device, self.denoiser, latent, self.mixed_precision)
        self.max_batch_images = plan.max_batch_images
        return plan

    def generate(self, concepts: list[Concept]) -> list[np.ndarray]:
        """Images of the original model W; half-precision autocast on GPUs (``precision`` auto:
        fp16, bf16 for the T5-conditioned families)."""

        def attempt(max_images: int | None) -> list[np.ndarray]:
            with (
                self.projections.weights_set(self.original),
                torch.autocast(self.device.type, dtype=self.half_dtype, enabled=self.mixed_precision),
            ):
                return generate_images(self.pipe, concepts, self.settings.data, max_images, self.progress)

        def shrink(size: int) -> None:
            self.max_batch_images = size

        total = len(concepts) * self.settings.data.images_per_concept
        return halve_on_oom(attempt, self.max_batch_images, total, shrink)

    def masks(self, concept: Concept, images: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        """The concept's masks for Eq. 3 and notes for the run report.

        Styles (TYPE_DEFAULTS whole_image_masks) and runs without a masker get whole-image
        masks; otherwise the masker's, where an image with no box falls back to a
        whole-image mask and is counted in ``whole_image_fallbacks``.
        """
        n, h, w = images.shape[:3]
        whole = {"whole_image_fallbacks": 0, "boxes": None, "empty_masks": 0}
        if TYPE_DEFAULTS[concept.type].whole_image_masks:
            return whole_image_masks(n, h, w), {"mask_source": "whole-image (style)", **whole}
        if self.masker is None or self.masker.name == "whole-image":
            return whole_image_masks(n, h, w), {"mask_source": "whole-image", **whole}
        r = self.masker(images, concept.text)
        return r.masks, {
            "mask_source": self.masker.name,
            "whole_image_fallbacks": r.fallbacks,
            "boxes": r.boxes,
            "empty_masks": r.empty,
        }

    def train(
        self, concepts: list[Concept], images: list[np.ndarray], masks: list[np.ndarray]
    ) -> list[tuple[LoraFactors, list[float], int]]:
        """Train the LoRAs; concepts with equal resolved settings share one UNet batch.

        Returns per concept its LoRA, its loss per step and the size of its UNet batch.
        """
        ts = self.settings.train
        groups: dict[Any, list[int]] = {}
        for i, c in enumerate(concepts):
            groups.setdefault(ts.resolve(c.type), []).append(i)
        out: list[tuple[LoraFactors, list[float], int] | None] = [None] * len(concepts)
        n_prompts = self.settings.prompts_per_concept

        def run(resolved: ResolvedTrain, idx: list[int]) -> list[tuple[LoraFactors, list[float], int]]:
            jobs = [
                TrainJob(
                    concept=concepts[i],
                    images=images_to_tensor(images[i]),
                    masks=torch.from_numpy(masks[i]),
                    prompts=concept_prompts(concepts[i])[:n_prompts],
                )
                for i in idx
            ]
            results = train_loras(
                self.denoiser,
                self.pipe.vae,
                self.noise_scheduler,
                self.encoder,
                jobs,
                ts,
                resolved,
                self.device,
                autocast=torch.bfloat16 if self.mixed_precision else None,
                progress=self.progress,
            )
            return [(r.lora, r.losses, len(idx)) for r in results]

        def shrink(size: int) -> None:
            self.concepts_per_batch = size

        with self.projections.weights_set(self.refined):
            for resolved, idx in groups.items():
                size = min(len(idx), self.concepts_per_batch or len(idx))
                results = shrink_on_oom(idx, size, lambda part, r=resolved: run(r, part), shrink)
                for i, r in zip(idx, results, strict=True):
                    out[i] = r
        return [o for o in out if o is not None]

    def data(self, concepts: list[Concept], images: list[np.ndarray] | None = None) -> list[ConceptData]:
        """Images (unless given: already generated ones are reused) and masks of a batch."""
        t0 = time.perf_counter()
        if images is None:
            images = self.generate(concepts)
        t1 = time.perf_counter()
        out = []
        for k, (c, im) in enumerate(zip(concepts, images, strict=True)):
            t = time.perf_counter()
            m, note = self.masks(c, im)
            self.progress("masks", k + 1, len(concepts))
            note["seconds"] = {
                "generate": round((t1 - t0) / len(concepts), 3),
                "mask": round(time.perf_counter() - t, 3),
            }
            out.append(ConceptData(c, im, m, note))
        return out

    def finish(self, data: list[ConceptData]) -> list[ConceptArtefacts]:
        """The LoRAs of a batch whose images and masks are ready (needs W')."""
        if self.refined is None:
            raise RuntimeError("the refined weights W' are needed to train; solve CFR first")
        t = time.perf_counter()
        concepts = [d.concept for d in data]
        trained = self.train(concepts, [d.images for d in data], [d.masks for d in data])
        per_concept = round((time.perf_counter() - t) / len(data), 3)
        out = []
        for d, (lora, losses, group) in zip(data, trained, strict=True):
            resolved = self.settings.train.resolve(d.concept.type)
            note = {
                **d.notes,
                "lr": resolved.lr,
                "steps": resolved.steps,
                "cfis": resolved.cfis,
                "train_batch": group,
                "seconds": {**d.notes.get("seconds", {}), "train": per_concept},
            }
            out.append(ConceptArtefacts(d.concept, d.images, d.masks, lora, losses, note))
        return out
