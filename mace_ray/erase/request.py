"""What ``mace-ray erase`` is asked to do: ``EraseRequest``, the method's settings
(mace_core/settings.py) nested beside where and how the job runs (``WhereItRuns``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from mace_core.concepts import ConceptType
from mace_core.options import Choice, Panel, argument, group, seconds, setting
from mace_core.settings import EraseSettings
from mace_ray.engine.requests import WhereItRuns, output_setting, path_setting, resume_setting

# --model's default: the paper's model.
DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"
# The stages of a MACE run, in order (mace_ray/erase/stages.py ERASE_STAGES; a test keeps the
# two equal): named here for --stages' help, which must not import the stages (torch).
STAGE_NAMES = (
    "text_statistics",
    "workers_start",
    "data",
    "cfr",
    "train",
    "fusion",
    "write",
    "erasure_report",
    "finish",
)


class Method(Choice):
    MACE = "mace"  # the method: closed-form refinement, a LoRA per concept, their fusion
    CFR = "cfr"  # closed-form refinement alone (Eq. 1-2): another result, so another run id


@dataclass(frozen=True)
class EraseRequest(WhereItRuns):
    concept_file: str = argument("Concept file: one 'text | type | anchor' per line.", name="concepts")
    model: str = setting(
        DEFAULT_MODEL,
        "Hub id, diffusers folder (local or s3://), or 'tiny' (built-in random model).",
        panel=Panel.MODEL,
        basic=True,
    )
    output: str = output_setting("Where runs are written")
    default_type: ConceptType = setting(
        ConceptType.OBJECT, "Type of lines without one.", name="type", panel=Panel.MODEL, basic=True
    )
    settings: EraseSettings = field(default_factory=EraseSettings, metadata=group())
    prior_captions: str | None = path_setting(
        "Caption file for the prior C_p (default: built-in captions).", Panel.MODEL
    )
    retain_file: str | None = path_setting(
        "Concept file of concepts to keep (the retained set C_r).", Panel.MODEL, name="retain", basic=True
    )
    # None: from the workers' free GPU memory
    concepts_per_batch: int | None = setting(
        None,
        "Concepts per worker batch, or auto: from the GPU's free memory (4 on CPUs).",
        none_as="auto",
        min=1,
        panel=Panel.CLUSTER,
    )
    resume: bool = resume_setting(
        "Start over: delete what an earlier run with the same inputs left (by default it is reused)."
    )
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
    lock_wait_s: float = seconds(
        90.0,
        "Seconds to wait for another driver running the same run before refusing.",
        "lock-wait",
        Panel.RUN,
    )
    # How long a cluster with an autoscaler may take to add a node the workers fit on.
    placement_wait_s: float = seconds(
        600.0,
        "Seconds an autoscaler may take to add a node the workers fit on.",
        "placement-wait",
        Panel.CLUSTER,
    )
    # Which stages run (mace_ray/erase/plan.py, plan_stages): checked in erase.prepare.
    stages: str = setting(
        "all",
        "all, or a partial run of --method mace: stage names, comma-separated, with the stages "
        f"they need ({', '.join(STAGE_NAMES)}); the full run takes it up (e.g. "
        "text_statistics,data: images and masks on cheap nodes).",
        panel=Panel.RUN,
    )

    # An earlier run to add CONCEPTS to (mace_ray/erase/extend.py); its inputs replace the defaults.
    extend: str | None = setting(
        None,
        "Add CONCEPTS to run RUN (a run id under OUTPUT, or the path or s3:// URL of its folder, "
        "ROOT/runs/<run_id>): a new run over both, with RUN's model, settings, retained set and "
        "captions; the images and masks of RUN's concepts in OUTPUT are reused, not made again.",
        name="from",
        panel=Panel.RUN,
        metavar="RUN",
    )
    method: Method = setting(
        Method.MACE,
        "mace (the method) or cfr (closed-form refinement alone, Eq. 1-2: no images, masks or "
        "LoRAs; the same outputs in seconds of solve time, under a run id of its own).",
        panel=Panel.MODEL,
        basic=True,
    )
