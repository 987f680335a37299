"""The jobs of an erase run: what its text workers, concept (GPU) workers and statistics
actor are asked to do (``mace_ray.engine.jobs``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mace_ray.engine.jobs import ConceptJob, Job

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
