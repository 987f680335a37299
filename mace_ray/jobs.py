"""Typed jobs: one small dataclass per kind of call a worker serves.

A job names the worker method that runs it (``method``) and carries its arguments as
fields, so a stage builds ``TrainConcepts(batch)`` rather than ``("process", (batch,))``
and a typo is an AttributeError at the point it is made. Jobs over concepts can shrink:
after a worker is lost, ``WorkerPool`` re-queues only the concepts whose completion
marker is not there yet (``ConceptJob.without``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from mace_core.concepts import Concept


@dataclass
class Job:
    """A call on some worker of a pool: ``getattr(worker, method)(*args())``."""

    method: ClassVar[str] = ""
    label: str = field(default="", kw_only=True)
    # Called on the driver with the job and its result when it finished.
    on_done: Callable[[Any, Any], None] | None = field(default=None, kw_only=True, repr=False)
    attempts: int = field(default=0, kw_only=True)

    def args(self) -> tuple[Any, ...]:
        """The method's positional arguments: the job's own fields, in order."""
        skip = {"label", "on_done", "attempts"}
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip)


@dataclass
class ConceptJob(Job):
    """A job over a batch of concepts, each with its own completion marker."""

    concepts: list[Concept] = field(default_factory=list)

    def without(self, finished: set[str]) -> ConceptJob | None:
        """The same job over the concepts not in ``finished`` (slugs); None if none are left."""
        rest = [c for c in self.concepts if c.slug not in finished]
        return dataclasses.replace(self, concepts=rest) if rest else None


def concept_label(stage: str, concepts: list[Concept]) -> str:
    """'train[dog-1a2b+3]': the stage, the batch's first concept and how many more."""
    return f"{stage}[{concepts[0].slug}+{len(concepts) - 1}]" if concepts else stage


# ------------------------------------------------------------------ text workers


@dataclass
class TextStats(ConceptJob):
    """CFR and fusion statistics of each concept (Eq. 1, 2, 7 sums), one file per concept."""

    method: ClassVar[str] = "text_stats"


@dataclass
class PriorStats(Job):
    """The prior C_p of the caption set, into the shared cache."""

    method: ClassVar[str] = "prior_stats"
    captions: list[str] = field(default_factory=list)


@dataclass
class PromptStats(Job):
    """The second moment of a prompt set (domain set C_d, retained set C_r) at ``key``."""

    method: ClassVar[str] = "prompt_stats"
    key: str = ""
    prompts: list[str] = field(default_factory=list)


# ------------------------------------------------------------------ concept (GPU) workers


@dataclass
class BatchPlan(Job):
    """How many concepts a worker's free memory holds per batch."""

    method: ClassVar[str] = "batch_plan"


@dataclass
class OriginalWeights(Job):
    """The model's original attn2 to_k/to_v weights."""

    method: ClassVar[str] = "original_weights"


@dataclass
class PrepareData(ConceptJob):
    """Training images and concept masks of each concept (MACE Stage 2 data)."""

    method: ClassVar[str] = "prepare_data"


@dataclass
class TrainConcepts(ConceptJob):
    """One LoRA per concept on the CFR-refined weights (Eq. 3, 5); DONE marker last."""

    method: ClassVar[str] = "train"


@dataclass
class WriteFinal(Job):
    """The erased pipeline, the compact erasure file and the CFR weights."""

    method: ClassVar[str] = "write_final"
    fused: Any = None  # an object-store reference under Ray
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass
class ConceptReport(ConceptJob):
    """Residuals and attention mass of each concept on the erased weights."""

    method: ClassVar[str] = "erasure_report"
    fused: Any = None


@dataclass
class DriftReport(Job):
    """How far the erased weights moved prompts that should not change."""

    method: ClassVar[str] = "drift_report"
    fused: Any = None
    prompts: list[str] = field(default_factory=list)


# ------------------------------------------------------------------ evaluation workers


@dataclass
class ScoreShard(Job):
    """Images of a shard of a suite's prompts with one model (stored ones reused), scored."""

    method: ClassVar[str] = "score_shard"
    tag: str = ""
    prompts: list[Any] = field(default_factory=list)  # EvalPrompt


@dataclass
class ReferenceFeatures(Job):
    """FID feature moments of a shard of reference images."""

    method: ClassVar[str] = "reference_features"
    paths: list[str] = field(default_factory=list)


# ------------------------------------------------------------------ audit workers


@dataclass
class AuditBaseline(Job):
    """A concept's plain prompt: its leak through the erased model, images of both models."""

    method: ClassVar[str] = "baseline"
    concept: Any = None  # mace_core.audit.concepts.AuditConcept


@dataclass
class AuditAttack(Job):
    """One attack on one concept through the erased model, measured, its images scored."""

    method: ClassVar[str] = "attack"
    concept: Any = None  # mace_core.audit.concepts.AuditConcept
    attack: str = ""
