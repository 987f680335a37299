"""What ``mace-ray erase`` is asked to do: ``EraseRequest``, the method's settings
(mace_core/settings.py) nested beside where and how the job runs (``WhereItRuns``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from mace_core.concepts import ConceptType
from mace_core.models import DEFAULT_MODEL
from mace_core.options import Panel, group, option, setting
from mace_core.settings import EraseSettings
from mace_ray.engine.requests import FILE, WhereItRuns


@dataclass(frozen=True)
class EraseRequest(WhereItRuns):
    concept_file: str = field(
        metadata=option("Concept file: one 'text | type | anchor' per line.", name="concepts", argument=True)
    )
    model: str = setting(
        DEFAULT_MODEL, "Hub id, local diffusers folder, or 'tiny' (built-in random model).", panel=Panel.MODEL
    )
    output: str = setting(
        "mace-runs", "Where runs are written: a folder or s3://bucket/prefix.", panel=Panel.MODEL
    )
    default_type: ConceptType = setting(
        ConceptType.OBJECT, "Type of lines without one.", name="type", panel=Panel.MODEL
    )
    settings: EraseSettings = field(default_factory=EraseSettings, metadata=group())
    prior_captions: str | None = setting(
        None, "Caption file for the prior C_p (default: built-in captions).", panel=Panel.MODEL, metavar=FILE
    )
    retain_file: str | None = setting(
        None,
        "Concept file of concepts to keep (the retained set C_r).",
        name="retain",
        panel=Panel.MODEL,
        metavar=FILE,
    )
    # None: from the workers' free GPU memory
    concepts_per_batch: int | None = setting(
        None,
        "Concepts per worker batch, or auto: from the GPU's free memory (4 on CPUs).",
        none_as="auto",
        min=1,
        panel=Panel.CLUSTER,
    )
    resume: bool = setting(True, "Reuse what an earlier run with the same inputs finished.", panel=Panel.RUN)
    # A concept whose residual (erasure report) stays above this fails the command after
    # everything is written; not part of the run id (it changes no result).
    max_residual: float | None = setting(
        None,
        "Exit 3 (after writing everything) if a concept's residual stays above this.",
        min=0.0,
        panel=Panel.RUN,
    )
    # A second driver on the same run waits this long for the first to finish (or for its
    # lease to expire) before it refuses; not part of the run id.
    lock_wait_s: float = setting(
        90.0,
        "Seconds to wait for another driver running the same run before refusing.",
        name="lock-wait",
        min=0.0,
        panel=Panel.RUN,
    )
    # How long a cluster with an autoscaler may take to add a node the workers fit on.
    placement_wait_s: float = setting(
        600.0,
        "Seconds an autoscaler may take to add a node the workers fit on.",
        name="placement-wait",
        min=0.0,
        panel=Panel.CLUSTER,
    )
    # Which stages run (mace_ray/erase/stages.py, plan_stages): checked in erase.prepare.
    stages: str = setting(
        "all",
        "all (the method); cfr (closed-form refinement only: no images, masks or LoRAs, "
        "a run of its own); or stage names, comma-separated, for a partial run (e.g. "
        "text_statistics,data to make images and masks on cheap nodes; the full run "
        "reuses them).",
        panel=Panel.RUN,
    )

    # An earlier run to add CONCEPTS to (mace_ray/erase/extend.py); its inputs replace the defaults.
    extend: str | None = setting(
        None,
        "Add CONCEPTS to run RUN under OUTPUT: a new run over both, with RUN's model, "
        "settings, retained set and captions; the images and masks of RUN's concepts are "
        "reused, not made again.",
        name="from",
        panel=Panel.RUN,
        metavar="RUN",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_residual is not None and not self.max_residual >= 0:
            raise ValueError(f"max_residual must be >= 0, got {self.max_residual}")
        if self.concepts_per_batch is not None and self.concepts_per_batch < 1:
            raise ValueError(f"concepts_per_batch must be >= 1, got {self.concepts_per_batch}")
        if not self.lock_wait_s >= 0:
            raise ValueError(f"lock_wait_s must be >= 0, got {self.lock_wait_s}")
