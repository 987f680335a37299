"""Typed jobs: one small dataclass per kind of call a worker serves.

A job names the worker method that runs it (``class TrainConcepts(ConceptJob,
method="train")``) and carries its arguments as fields, so a stage builds
``TrainConcepts(batch)`` rather than ``("process", (batch,))``
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

    method: ClassVar[str] = ""  # the worker method, set by each job: class X(Job, method="...")
    label: str = field(default="", kw_only=True)
    # Called on the driver with the job and its result when it finished.
    on_done: Callable[[Any, Any], None] | None = field(default=None, kw_only=True, repr=False)
    attempts: int = field(default=0, kw_only=True)

    def __init_subclass__(cls, method: str = "", **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if method:
            cls.method = method

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
class TextStats(ConceptJob, method="text_stats"):
    """CFR and fusion statistics of each concept (Eq. 1, 2, 7 sums), one file per concept."""


@dataclass
class PriorStats(Job, method="prior_stats"):
    """The prior C_p of the caption set, into the shared cache."""

    captions: list[str] = field(default_factory=list)


@dataclass
class PromptStats(Job, method="prompt_stats"):
    """The second moment of a prompt set (domain set C_d, retained set C_r) at ``key``."""

    key: str = ""
    prompts: list[str] = field(default_factory=list)


# ------------------------------------------------------------------ concept (GPU) workers


@dataclass
class BatchPlan(Job, method="batch_plan"):
    """How many concepts a worker's free memory holds per batch."""


@dataclass
class OriginalWeights(Job, method="original_weights"):
    """The model's original attn2 to_k/to_v weights."""


@dataclass
class PrepareData(ConceptJob, method="prepare_data"):
    """Training images and concept masks of each concept (MACE Stage 2 data)."""


@dataclass
class TrainConcepts(ConceptJob, method="train"):
    """One LoRA per concept on the CFR-refined weights (Eq. 3, 5); DONE marker last."""


@dataclass
class WriteFinal(Job, method="write_final"):
    """The erased pipeline, the compact erasure file and the CFR weights."""

    fused: Any = None  # an object-store reference under Ray
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass
class ConceptReport(ConceptJob, method="erasure_report"):
    """Residuals and attention mass of each concept on the erased weights."""

    fused: Any = None


@dataclass
class DriftReport(Job, method="drift_report"):
    """How far the erased weights moved prompts that should not change."""

    fused: Any = None
    prompts: list[str] = field(default_factory=list)


# ------------------------------------------------------------------ evaluation workers


@dataclass
class ScoreShard(Job, method="score_shard"):
    """Images of a shard of a suite's prompts with one model (stored ones reused), scored."""

    tag: str = ""
    prompts: list[Any] = field(default_factory=list)  # EvalPrompt


@dataclass
class ReferenceFeatures(Job, method="reference_features"):
    """FID feature moments of a shard of reference images."""

    paths: list[str] = field(default_factory=list)


# ------------------------------------------------------------------ audit workers


@dataclass
class AuditBaseline(Job, method="baseline"):
    """A concept's plain prompt: its leak through the erased model, images of both models."""

    concept: Any = None  # mace_core.audit.concepts.AuditConcept


@dataclass
class AuditAttack(Job, method="attack"):
    """One attack on one concept through the erased model, measured, its images scored."""

    concept: Any = None  # mace_core.audit.concepts.AuditConcept
    attack: str = ""
