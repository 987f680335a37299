"""The jobs of an audit run's workers (``mace_ray.engine.jobs``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mace_ray.engine.jobs import Job


@dataclass
class AuditBaseline(Job, method="baseline"):
    """A concept's plain prompt: its leak through the erased model, images of both models."""

    concept: Any = None  # mace_core.audit.concepts.AuditConcept


@dataclass
class AuditAttack(Job, method="attack"):
    """One attack on one concept through the erased model, measured, its images scored."""

    concept: Any = None  # mace_core.audit.concepts.AuditConcept
    attack: str = ""
