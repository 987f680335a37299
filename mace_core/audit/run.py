"""One audit job's computation, as the workers call it: an attack on a concept, or the
concept's plain-prompt figures, and images of any prompt from either model."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from mace_core.audit.attacks import make_attack
from mace_core.audit.base import AttackResult
from mace_core.audit.concepts import AuditConcept
from mace_core.audit.context import AttackContext, AuditModels
from mace_core.audit.embedding import AttackPrompt
from mace_core.audit.generation import generate, image_seeds
from mace_core.audit.measures import Measure
from mace_core.audit.settings import AuditSettings
from mace_core.progress import Progress, no_progress


def run_attack(
    models: AuditModels,
    concept: AuditConcept,
    attack: str,
    settings: AuditSettings,
    budget_s: float | None = None,
    progress: Progress = no_progress,
    original_images: Callable[[int], np.ndarray] | None = None,
) -> AttackResult:
    """Attack ``concept`` with ``attack`` through the erased model, measured on held-out templates."""
    ctx = AttackContext(
        models,
        concept,
        models.meter(concept),
        settings.seed,
        budget_s=budget_s,
        progress=progress,
        original_images=original_images,
    )
    return make_attack(attack, settings.attacks).run(ctx)


def plain_measure(models: AuditModels, concept: AuditConcept) -> Measure:
    """The concept's own prompt through the erased model: the leak the erasure leaves with no attack."""
    return models.meter(concept).measure(AttackPrompt(concept.concept.text))


def prompt_images(
    models: AuditModels,
    concept: AuditConcept,
    prompt: AttackPrompt,
    settings: AuditSettings,
    model: str = "erased",
    n: int | None = None,
    progress: Progress = no_progress,
) -> np.ndarray:
    """``n`` (default ``settings.images``) images of ``prompt`` from the ``original`` or
    ``erased`` model, with the concept's audit seeds."""
    side = models.original if model == "original" else models.erased
    seeds = image_seeds(settings.seed, concept.concept, settings.images if n is None else n)
    return generate(side.pipe, side.text, concept.concept, prompt, seeds, settings.generation, progress)
