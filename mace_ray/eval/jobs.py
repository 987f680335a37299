"""The jobs of an evaluation run's workers (``mace_ray.engine.jobs``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mace_ray.engine.jobs import Job


@dataclass
class ScoreShard(Job, method="score_shard"):
    """Images of a shard of a suite's prompts with one model (stored ones reused), scored."""

    tag: str = ""
    prompts: list[Any] = field(default_factory=list)  # EvalPrompt


@dataclass
class ReferenceFeatures(Job, method="reference_features"):
    """FID feature moments of a shard of reference images."""

    paths: list[str] = field(default_factory=list)
