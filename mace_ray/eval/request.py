"""What ``mace-ray eval`` is asked to do: ``EvalRequest``, the generation settings
(mace_core/evaluation/generation.py) nested beside where and how the job runs."""

from __future__ import annotations

from dataclasses import dataclass, field

from mace_core.errors import SettingError
from mace_core.evaluation.settings import CLIP_RECOGNIZER, GenerationSettings, clip_setting
from mace_core.options import Choice, Panel, argument, group, option, setting
from mace_ray.engine.requests import FOLDER, WhereItRuns, output_setting, path_setting, resume_setting


class SuiteName(Choice):
    OBJECTS = "objects"
    CELEBRITIES = "celebrities"
    STYLES = "styles"
    EXPLICIT = "explicit"
    COCO = "coco"


@dataclass(frozen=True)
class EvalRequest(WhereItRuns):
    model: str = argument(
        "Model to evaluate: hub id, diffusers folder, 'tiny', or an erase run's final/pipeline "
        "folder (or its runs/<run_id> folder: erased and retained concepts come from it); "
        "folders local or s3://."
    )
    suite: SuiteName = field(metadata=option("Evaluation protocol (paper Sec. 4).", panel=Panel.SUITE))
    # The original model: evaluated in the same run, printed beside.
    baseline: str | None = setting(
        None,
        "The original model, evaluated in the same run and printed beside MODEL.",
        panel=Panel.MODEL,
        basic=True,
    )
    output: str = output_setting("Where evals/ is written")
    # Concept files; default: the erase run's concepts and retained set.
    erased_file: str | None = path_setting(
        "Concept file of the erased concepts (objects/celebrities/styles; default: the erase run's).",
        Panel.SUITE,
        name="erased",
    )
    retained_file: str | None = path_setting(
        "Concept file of retained celebrities/artists (default: the erase run's --retain set).",
        Panel.SUITE,
        name="retained",
    )
    prompts_csv: str | None = path_setting(
        "explicit: I2P CSV (column prompt; sd_seed, sd_guidance_scale, ... used when present); "
        "coco: captions CSV (column caption; image_id optional).",
        Panel.SUITE,
        basic=True,
    )
    reference_images: str | None = path_setting(
        "coco: folder of real images (e.g. MS-COCO val) for FID.", Panel.SUITE, metavar=FOLDER, basic=True
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
    fid_weights: str | None = path_setting(
        "coco: FID Inception-v3 weights, a .safetensors file (default: FID on CLIP features).", Panel.SCORING
    )
    shard_size: int = setting(32, "Images per worker job.", min=1, panel=Panel.CLUSTER)
    resume: bool = resume_setting(
        "Make every image again (by default those an earlier eval stored are reused)."
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.seeds and self.images_per_prompt is not None:
            raise SettingError("give --seeds or --images, not both (one image per listed seed)")
