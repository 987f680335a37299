"""What ``mace-ray erase`` and ``mace-ray eval`` are asked to do: ``EraseRequest`` and
``EvalRequest``, their method settings nested (mace_core/settings.py, GenerationSettings in
mace_core/evaluation/generation.py) beside where and how the job runs.

Every field carries its command-line metadata (mace_core/options.py); mace_ray/cli_build.py
builds both commands from these classes. Kept free of the job modules (diffusers, Ray) so
that ``mace-ray --help`` stays quick; mace_ray/erase.py and mace_ray/evaluate.py import the
requests from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mace_core.concepts import ConceptType
from mace_core.evaluation.clip_model import clip_setting
from mace_core.evaluation.generation import GenerationSettings
from mace_core.evaluation.recognition import CLIP_RECOGNIZER
from mace_core.models import DEFAULT_MODEL
from mace_core.options import Choice, Panel, coerce_choices, group, option, setting
from mace_core.settings import EraseSettings


class Executor(Choice):
    RAY = "ray"  # a Ray cluster, or a local Ray
    LOCAL = "local"  # everything in this process


class SuiteName(Choice):
    OBJECTS = "objects"
    CELEBRITIES = "celebrities"
    STYLES = "styles"
    EXPLICIT = "explicit"
    COCO = "coco"


# Options of both commands: one text each.
EXECUTOR = option("ray (a cluster, or a local Ray) or local (this process).", panel=Panel.CLUSTER)
ADDRESS = option("Ray cluster address (default: RAY_ADDRESS, else start a local Ray).", panel=Panel.CLUSTER)
GPUS_PER_WORKER = option(
    "GPUs per worker, fractions allowed (default: 1 if the cluster has GPUs).", min=0.0, panel=Panel.CLUSTER
)
DEVICE = option("torch device (default: cuda if present, else cpu).", panel=Panel.CLUSTER)
S3_ENDPOINT = option("S3 endpoint URL (default: AWS_ENDPOINT_URL, else AWS).", panel=Panel.CLUSTER)
VERBOSE = option("Progress lines on stderr.", name="verbose", negative="quiet", panel=Panel.RUN)

FILE, FOLDER = "<file>", "<folder>"


@dataclass(frozen=True, kw_only=True)
class WhereItRuns:
    """Where and how a job runs: the options erase, eval and audit share, declared once.

    Keyword-only, so that each request's own fields keep their positions.
    """

    executor: Executor = field(default=Executor.RAY, metadata=EXECUTOR)
    # Ray cluster; None: RAY_ADDRESS, else a local Ray
    address: str | None = field(default=None, metadata=ADDRESS)
    # None: one per GPU (gpus_per_worker each), else 1
    workers: int | None = setting(
        None, "Workers (default: one per GPU of the cluster, else 1).", min=1, panel=Panel.CLUSTER
    )
    # None: 1 if the cluster has GPUs, else 0
    gpus_per_worker: float | None = field(default=None, metadata=GPUS_PER_WORKER)
    device: str | None = field(default=None, metadata=DEVICE)
    s3_endpoint: str | None = field(default=None, metadata=S3_ENDPOINT)
    # Progress bars and lines inside the stages (the CLI's --quiet: off).
    progress: bool = field(default=True, metadata=VERBOSE)

    def __post_init__(self) -> None:
        coerce_choices(self, {"executor": (Executor, "executor")})
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")

    def for_workers(self) -> dict[str, Any]:
        """What every worker's spec copies from the request: the S3 endpoint of its output,
        its torch device, whether it draws progress."""
        return {"s3_endpoint": self.s3_endpoint, "device": self.device, "progress": self.progress}


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
    # Which stages run (mace_ray/erase_stages.py, plan_stages): checked in erase.prepare.
    stages: str = setting(
        "all",
        "all (the method); cfr (closed-form refinement only: no images, masks or LoRAs, "
        "a run of its own); or stage names, comma-separated, for a partial run (e.g. "
        "text_statistics,data to make images and masks on cheap nodes; the full run "
        "reuses them).",
        panel=Panel.RUN,
    )

    # An earlier run to add CONCEPTS to (mace_ray/extend.py); its inputs replace the defaults.
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


@dataclass(frozen=True)
class EvalRequest(WhereItRuns):
    model: str = field(
        metadata=option(
            "Model to evaluate: hub id, local diffusers folder, 'tiny', or an erase run's final/pipeline "
            "folder (or its runs/<run_id> folder: erased and retained concepts come from it).",
            argument=True,
        )
    )
    suite: SuiteName = field(metadata=option("Evaluation protocol (paper Sec. 4).", panel=Panel.SUITE))
    # The original model: evaluated in the same run, printed beside.
    baseline: str | None = setting(
        None, "The original model, evaluated in the same run and printed beside MODEL.", panel=Panel.MODEL
    )
    output: str = setting(
        "mace-runs", "Where evals/ is written: a folder or s3://bucket/prefix.", panel=Panel.MODEL
    )
    # Concept files; default: the erase run's concepts and retained set.
    erased_file: str | None = setting(
        None,
        "Concept file of the erased concepts (objects/celebrities/styles; default: the erase run's).",
        name="erased",
        panel=Panel.SUITE,
        metavar=FILE,
    )
    retained_file: str | None = setting(
        None,
        "Concept file of retained celebrities/artists (default: the erase run's --retain set).",
        name="retained",
        panel=Panel.SUITE,
        metavar=FILE,
    )
    prompts_csv: str | None = setting(
        None,
        "explicit: I2P CSV (column prompt; sd_seed, sd_guidance_scale, ... used when present); "
        "coco: captions CSV (column caption; image_id optional).",
        panel=Panel.SUITE,
        metavar=FILE,
    )
    reference_images: str | None = setting(
        None, "coco: folder of real images (e.g. MS-COCO val) for FID.", panel=Panel.SUITE, metavar=FOLDER
    )
    limit: int | None = setting(None, "Only the first N rows of --prompts-csv.", min=1, panel=Panel.SUITE)
    # None: the suite's default (the paper's)
    images_per_prompt: int | None = setting(
        None,
        "Images (seeds) per prompt (default: objects 200, celebrities/styles 5, else 1).",
        name="images",
        aliases=("images-per-prompt",),
        min=1,
        panel=Panel.SUITE,
    )
    seeds: tuple[int, ...] | None = setting(
        None, "Exact seeds, repeatable (--seeds 0 --seeds 1): every prompt once per seed.", panel=Panel.SUITE
    )
    seed: int = setting(0, "Base of the derived per-prompt seeds.", panel=Panel.SUITE)
    generation: GenerationSettings = field(
        default_factory=GenerationSettings, metadata=group(panel=Panel.GENERATION)
    )
    clip: str | None = clip_setting("CLIP for scoring")
    recognizer: str = setting(
        CLIP_RECOGNIZER,
        "celebrities: 'clip' (zero-shot over the names) or 'module:factory'.",
        panel=Panel.SCORING,
    )
    fid_weights: str | None = setting(
        None,
        "coco: FID Inception-v3 weights, a .safetensors file (default: FID on CLIP features).",
        panel=Panel.SCORING,
        metavar=FILE,
    )
    shard_size: int = setting(32, "Images per worker job.", min=1, panel=Panel.CLUSTER)
    resume: bool = setting(True, "Reuse images stored by an earlier eval.", panel=Panel.RUN)

    def __post_init__(self) -> None:
        super().__post_init__()
        coerce_choices(self, {"suite": (SuiteName, "suite")})
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size}")
        if self.seeds and self.images_per_prompt is not None:
            raise ValueError("give --seeds or --images, not both (one image per listed seed)")
