"""Settings of an erase run: frozen dataclasses that round-trip to JSON.

Weights of the closed forms are on a *per-token mean* scale: each sum of outer
products is divided by its token count, so a weight of 1 gives a preservation term
the same emphasis as the mapping term whatever the size of the caption file or the
number of concepts. The paper's raw weights (applied to plain sums) relate to ours as::

    a_raw = a * N_f / N_p        (prior; N_f tokens of the mapping term, N_p prior tokens)
    w_raw = w * N_f / N_d        (domain set, N_d its tokens)
    q_raw = q * N_f / N_r        (retained set, N_r its tokens)
    r_raw = r * N_f              (ridge)

with N_f the aligned concept tokens (CFR) or all concept tokens (fusion). A weight
left at None takes the value that reproduces the paper's training configuration for
the run's concept type and number of concepts (``mace_core.closed_form_weights``).
Every run's report records the token counts and both scales of every weight.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from mace_core.concepts import ConceptType
from mace_core.errors import SettingError
from mace_core.options import Choice, Panel, Settings, group, internal, plain, setting


@dataclass(frozen=True)
class ClosedFormSettings(Settings):
    """Weights of one closed form (CFR Eq. 2 or fusion Eq. 7), per-token mean scale.

    None: the paper's value for the run's type and size (``closed_form_weights``).
    ``retain_weight`` weighs the user's retained set (``--retain``) against the erased
    concepts; the paper's configurations have no such term.
    """

    prior_weight: float | None = setting(
        None, "{group}: prior weight, per-token mean (default: the paper's for the run).", min=0.0
    )
    domain_weight: float | None = setting(
        None,
        "Weight w of the domain set ('a person' prompts) in both closed forms (default: the paper's).",
        name="domain-weight",
        shared=True,
        min=0.0,
    )
    ridge: float | None = setting(None, "{group}: ridge r, per-token mean (default: the paper's).", min=0.0)
    retain_weight: float = setting(
        1.0,
        "Weight of the --retain set against the erased concepts, in both closed forms.",
        name="retain-weight",
        shared=True,
        min=0.0,
    )


@dataclass(frozen=True)
class TrainDefaults:
    lr: float
    steps: int
    cfis: bool
    whole_image_masks: bool


# The paper's published training configurations, per concept type.
TYPE_DEFAULTS: dict[ConceptType, TrainDefaults] = {
    ConceptType.OBJECT: TrainDefaults(lr=1e-5, steps=50, cfis=True, whole_image_masks=False),
    ConceptType.CELEBRITY: TrainDefaults(lr=1e-4, steps=50, cfis=True, whole_image_masks=False),
    ConceptType.STYLE: TrainDefaults(lr=1e-4, steps=50, cfis=True, whole_image_masks=True),
    ConceptType.EXPLICIT: TrainDefaults(lr=1e-5, steps=120, cfis=False, whole_image_masks=False),
}


class LoraInit(Choice):
    # A ~ N(0, 1/rank^2), B = 0, as diffusers' LoRALinearLayer and the paper's experiments.
    GAUSSIAN = "gaussian"
    # PEFT's default (A uniform in +-1/sqrt(d_in)): ~sqrt(d_in) times smaller, which at the
    # paper's learning rates leaves the LoRA stage near a no-op.
    KAIMING = "kaiming"


LORA_INITS = LoraInit.values()


@dataclass(frozen=True)
class TrainSettings(Settings):
    """LoRA training (paper Sec. 3.2). ``None`` fields take the concept type's default."""

    rank: int = setting(1, "LoRA rank.", min=1)
    lr: float | None = setting(None, "LoRA learning rate (default: per type).", min=0.0)
    steps: int | None = setting(None, "LoRA steps (default: per type).", name="train-steps", min=0)
    cfis: bool | None = field(default=None, metadata=internal("the paper's per-type setting (TYPE_DEFAULTS)"))
    weight_decay: float = field(default=1e-2, metadata=internal("the authors' optimizer setting"))
    grad_clip: float = field(default=1.0, metadata=internal("the authors' optimizer setting"))
    # Eq. 3 squares the Frobenius norm; the authors' experiments used the plain norm.
    squared_loss: bool = setting(False, "Square the Frobenius norm of Eq. 3.")
    # The experiments also penalise attention to end-of-text/padding positions.
    penalize_eot: bool = setting(
        True,
        "Suppress attention to the concept's tokens only (by default also to end-of-text and "
        "padding positions, as the reference experiments did).",
        name="no-penalize-eot",
    )
    cfis_t1: int = field(default=200, metadata=internal("the paper's CFIS schedule"))
    cfis_t2: int = field(default=400, metadata=internal("the paper's CFIS schedule"))
    cfis_gamma: float = field(default=0.05, metadata=internal("the paper's CFIS schedule"))
    seed: int = setting(0, "Seed of training images, LoRA init and training draws.", shared=True)
    lora_init: LoraInit = setting(
        LoraInit.GAUSSIAN,
        "LoRA start: gaussian (A ~ N(0, 1/rank^2), the paper's) or kaiming (PEFT's default).",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.cfis_t1 < self.cfis_t2 <= 999:
            raise SettingError(f"need 0 <= cfis_t1 < cfis_t2 <= 999, got {self.cfis_t1}, {self.cfis_t2}")

    def resolve(self, type_: ConceptType) -> ResolvedTrain:
        d = TYPE_DEFAULTS[type_]
        return ResolvedTrain(
            lr=d.lr if self.lr is None else self.lr,
            steps=d.steps if self.steps is None else self.steps,
            cfis=d.cfis if self.cfis is None else self.cfis,
        )


@dataclass(frozen=True)
class ResolvedTrain:
    lr: float
    steps: int
    cfis: bool


@dataclass(frozen=True)
class DataSettings(Settings):
    """Training images (MACE Stage 2): DPM-Solver, 30 steps, CFG 7.5, fixed seeds."""

    images_per_concept: int = setting(8, "Training images per concept.", name="images", min=1)
    inference_steps: int = setting(30, "DPM-Solver steps per training image.", min=1)
    guidance_scale: float = field(default=7.5, metadata=internal("the paper's CFG scale for training images"))
    # None: the model's native size (512 px for SD 1.x)
    resolution: int | None = field(default=None, metadata=internal("the model's native size, as the paper"))
    seed: int = setting(0, shared=True)  # help: TrainSettings.seed


class Precision(Choice):
    # On CUDA: fp16 for generation, bf16 autocast for training (LoRA weights and optimizer
    # state stay fp32); on CPU everything fp32.
    AUTO = "auto"
    FP32 = "fp32"


class Masker(Choice):
    GROUNDED_SAM = "grounded-sam"
    SEGMENT_ANYTHING = "segment-anything"
    WHOLE_IMAGE = "whole-image"


MASKERS = Masker.values()


@dataclass(frozen=True)
class MaskSettings(Settings):
    """Concept masks (MACE Stage 2): Grounding DINO boxes for the concept text, SAM masks.

    ``masker``: ``grounded-sam`` (transformers Grounding DINO + SAM), ``segment-anything``
    (Grounding DINO boxes, an original SAM ``.pth`` checkpoint as ``segmenter``) or
    ``whole-image``. ``detector`` / ``segmenter``: hub id, local folder (or ``.pth`` file),
    or ``tiny`` for built-in random models; None picks the default for the model.
    """

    masker: Masker = setting(
        Masker.GROUNDED_SAM,
        "Concept masks: grounded-sam (Grounding DINO boxes, SAM masks), segment-anything "
        "(the same with an original SAM .pth as --segmenter) or whole-image.",
    )
    detector: str | None = setting(
        None, "Grounding DINO: hub id, folder (local or s3://) or 'tiny' (default: for the model)."
    )
    segmenter: str | None = setting(
        None, "SAM: hub id, folder, 'tiny', or a .pth (segment-anything); local or s3://."
    )
    box_threshold: float = setting(0.3, "Grounding DINO box threshold.", min=0.0, max=1.0)
    text_threshold: float = setting(0.25, "Grounding DINO text threshold.", min=0.0, max=1.0)


@dataclass(frozen=True)
class EraseSettings(Settings):
    cfr: ClosedFormSettings = field(
        default_factory=ClosedFormSettings,
        metadata=group(prefix="cfr", title="CFR (Eq. 2)", panel=Panel.CLOSED_FORMS),
    )
    fusion: ClosedFormSettings = field(
        default_factory=ClosedFormSettings,
        metadata=group(prefix="fusion", title="Fusion (Eq. 7)", panel=Panel.CLOSED_FORMS),
    )
    train: TrainSettings = field(default_factory=TrainSettings, metadata=group(panel=Panel.TRAIN))
    data: DataSettings = field(default_factory=DataSettings, metadata=group(panel=Panel.DATA))
    masks: MaskSettings = field(default_factory=MaskSettings, metadata=group(panel=Panel.DATA))
    # Templates per concept for the statistics and training prompts (the paper: 30);
    # None: all of the type's templates.
    prompts_per_concept: int | None = setting(
        30,
        "Templates per concept for statistics and training prompts, or all (the paper: 30).",
        none_as="all",
        min=1,
        panel=Panel.DATA,
    )
    # The reference experiments apply the prior and domain scales twice in CFR (s^2) and
    # once in the fusion; their reported numbers come from that. False: once in both, as
    # Eq. 2 reads. Only used for weights left at None.
    cfr_scale_squared: bool = setting(
        True,
        "With the paper's weights, apply the prior/domain scale once in CFR, as Eq. 2 reads "
        "(by default squared, as the reference experiments did).",
        name="no-cfr-scale-squared",
        panel=Panel.CLOSED_FORMS,
    )
    precision: Precision = setting(
        Precision.AUTO,
        "auto: fp16 generation and bf16 training autocast on CUDA, fp32 on CPU; fp32: fp32 everywhere.",
        panel=Panel.CLUSTER,
    )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (choices as strings): report.json's settings, hashed into run ids."""
        return plain(dataclasses.asdict(self))
