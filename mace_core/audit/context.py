"""What an attack works with: both models side by side, and one concept's context.

``AuditModels`` holds the ORIGINAL model (the one before erasure: its keys/values of a
concept are what leaks are measured against, its images are what concept inversion learns
from) and the ERASED model under audit (the one every attack runs through). ``AttackContext``
binds them to one concept: its leak meter, its seeds, the time it may take and the
original model's images of it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mace_core.audit.concepts import AuditConcept
from mace_core.audit.embedding import TokenEncoder
from mace_core.audit.measures import LeakMeter
from mace_core.erasure_report import KVProjection
from mace_core.errors import ModelLoadError
from mace_core.families import family_of_pipeline
from mace_core.families.base import ModelFamily, PromptEncoder
from mace_core.models import pipeline_projections, pipeline_prompt_encoder
from mace_core.progress import Progress, no_progress
from mace_core.train import concept_seed


@dataclass
class ModelSide:
    """One pipeline and what the audit reads off it."""

    pipe: Any
    family: ModelFamily
    prompts: PromptEncoder  # the family's encoder (UNet call, conditioning)
    text: TokenEncoder  # the same text encoders, taking attack prompts
    kv: KVProjection  # every edited projection stacked (attn2 to_k / to_v, an MMDiT's context_embedder)

    @classmethod
    def of(cls, pipe: Any, device: torch.device) -> ModelSide:
        prompts = pipeline_prompt_encoder(pipe, device)
        return cls(
            pipe,
            family_of_pipeline(pipe),
            prompts,
            TokenEncoder(prompts),
            KVProjection(pipeline_projections(pipe).weights(), device),
        )


@dataclass
class AuditModels:
    original: ModelSide
    erased: ModelSide
    device: torch.device

    @classmethod
    def of(cls, original_pipe: Any, erased_pipe: Any, device: torch.device) -> AuditModels:
        """Both pipelines (on ``device``), frozen: attacks train only their own prompt parameters."""
        for pipe in (original_pipe, erased_pipe):
            for part in (family_of_pipeline(pipe).denoiser(pipe), pipe.vae):
                part.requires_grad_(False)
        original, erased = ModelSide.of(original_pipe, device), ModelSide.of(erased_pipe, device)
        for side in (original, erased):
            side.text.freeze()  # every text encoder the family has
        if original.kv.keys != erased.kv.keys or original.kv.W.shape != erased.kv.W.shape:
            raise ModelLoadError(
                "the audited model and the original differ in their edited projections: "
                "--original must be the model the erasure started from"
            )
        sizes = [[len(t.tokenizer) for t in side.text.towers] for side in (original, erased)]
        if sizes[0] != sizes[1]:
            raise ModelLoadError("the audited model and the original have different tokenizers")
        return cls(original, erased, device)

    def meter(self, concept: AuditConcept, templates: tuple[str, ...] | None = None) -> LeakMeter:
        return LeakMeter(
            concept.concept, self.original.text, self.original.kv, self.erased.text, self.erased.kv, templates
        )


@dataclass
class AttackContext:
    """One concept under attack: the models, its leak meter (held-out templates), its seed,
    its deadline and the original model's images of it (made or read on first use)."""

    models: AuditModels
    concept: AuditConcept
    meter: LeakMeter
    seed: int
    budget_s: float | None = None  # wall-clock seconds this attack may take (None: no limit)
    progress: Progress = no_progress
    original_images: Callable[[int], np.ndarray] | None = None  # n -> uint8 (n, H, W, 3)
    started: float = field(default_factory=time.monotonic)

    def seed_for(self, purpose: str) -> int:
        """A seed of this concept and purpose, stable across machines and job layouts."""
        return concept_seed(self.seed, self.concept.concept, purpose)

    def out_of_time(self) -> bool:
        return self.budget_s is not None and time.monotonic() - self.started >= self.budget_s
