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
import json
from dataclasses import dataclass, field
from typing import Any

from mace_core.concepts import ConceptType


@dataclass(frozen=True)
class ClosedFormSettings:
    """Weights of one closed form (CFR Eq. 2 or fusion Eq. 7), per-token mean scale.

    None: the paper's value for the run's type and size (``closed_form_weights``).
    ``retain_weight`` weighs the user's retained set (``--retain``) against the erased
    concepts; the paper's configurations have no such term.
    """

    prior_weight: float | None = None
    domain_weight: float | None = None
    ridge: float | None = None
    retain_weight: float = 1.0

    def __post_init__(self) -> None:
        for name in ("prior_weight", "domain_weight", "ridge", "retain_weight"):
            value = getattr(self, name)
            if value is not None and not value >= 0:  # also refuses NaN
                raise ValueError(f"{name} must be >= 0, got {value}")


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


LORA_INITS = ("gaussian", "kaiming")


@dataclass(frozen=True)
class TrainSettings:
    """LoRA training (paper Sec. 3.2). ``None`` fields take the concept type's default."""

    rank: int = 1
    lr: float | None = None
    steps: int | None = None
    cfis: bool | None = None
    weight_decay: float = 1e-2
    grad_clip: float = 1.0
    # Eq. 3 squares the Frobenius norm; the authors' experiments used the plain norm.
    squared_loss: bool = False
    # The experiments also penalise attention to end-of-text/padding positions.
    penalize_eot: bool = True
    cfis_t1: int = 200
    cfis_t2: int = 400
    cfis_gamma: float = 0.05
    seed: int = 0
    # "gaussian": A ~ N(0, 1/rank^2), B = 0, as diffusers' LoRALinearLayer and the paper's
    # experiments; "kaiming": PEFT's default (A uniform in +-1/sqrt(d_in)), ~sqrt(d_in)
    # times smaller, which at the paper's learning rates leaves the LoRA stage near a no-op.
    lora_init: str = "gaussian"

    def __post_init__(self) -> None:
        if self.lora_init not in LORA_INITS:
            raise ValueError(f"unknown lora_init {self.lora_init!r} (valid: {', '.join(LORA_INITS)})")
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if self.steps is not None and self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if not 0 <= self.cfis_t1 < self.cfis_t2 <= 999:
            raise ValueError(f"need 0 <= cfis_t1 < cfis_t2 <= 999, got {self.cfis_t1}, {self.cfis_t2}")

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
class DataSettings:
    """Training images (MACE Stage 2): DPM-Solver, 30 steps, CFG 7.5, fixed seeds."""

    images_per_concept: int = 8
    inference_steps: int = 30
    guidance_scale: float = 7.5
    resolution: int | None = None  # None: the model's native size (512 px for SD 1.x)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.images_per_concept < 1:
            raise ValueError(f"images_per_concept must be >= 1, got {self.images_per_concept}")


PRECISIONS = ("auto", "fp32")
MASKERS = ("grounded-sam", "segment-anything", "whole-image")


@dataclass(frozen=True)
class MaskSettings:
    """Concept masks (MACE Stage 2): Grounding DINO boxes for the concept text, SAM masks.

    ``masker``: ``grounded-sam`` (transformers Grounding DINO + SAM), ``segment-anything``
    (Grounding DINO boxes, an original SAM ``.pth`` checkpoint as ``segmenter``) or
    ``whole-image``. ``detector`` / ``segmenter``: hub id, local folder (or ``.pth`` file),
    or ``tiny`` for built-in random models; None picks the default for the model.
    """

    masker: str = "grounded-sam"
    detector: str | None = None
    segmenter: str | None = None
    box_threshold: float = 0.3
    text_threshold: float = 0.25

    def __post_init__(self) -> None:
        if self.masker not in MASKERS:
            raise ValueError(f"unknown masker {self.masker!r} (valid: {', '.join(MASKERS)})")
        for name in ("box_threshold", "text_threshold"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")


@dataclass(frozen=True)
class EraseSettings:
    cfr: ClosedFormSettings = field(default_factory=ClosedFormSettings)
    fusion: ClosedFormSettings = field(default_factory=ClosedFormSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    data: DataSettings = field(default_factory=DataSettings)
    masks: MaskSettings = field(default_factory=MaskSettings)
    # Templates per concept for the statistics and training prompts (the paper: 30);
    # None: all of the type's templates.
    prompts_per_concept: int | None = 30
    # The reference experiments apply the prior and domain scales twice in CFR (s^2) and
    # once in the fusion; their reported numbers come from that. False: once in both, as
    # Eq. 2 reads. Only used for weights left at None.
    cfr_scale_squared: bool = True
    # "auto": on CUDA, fp16 autocast for generation and bf16 autocast for training (LoRA
    # weights and optimizer state stay fp32); on CPU everything fp32. "fp32": fp32 everywhere.
    precision: str = "auto"

    def __post_init__(self) -> None:
        if self.prompts_per_concept is not None and self.prompts_per_concept < 1:
            raise ValueError(f"prompts_per_concept must be >= 1, got {self.prompts_per_concept}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r} (valid: {', '.join(PRECISIONS)})")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EraseSettings:
        return cls(
            cfr=ClosedFormSettings(**d["cfr"]),
            fusion=ClosedFormSettings(**d["fusion"]),
            train=TrainSettings(**d["train"]),
            data=DataSettings(**d["data"]),
            masks=MaskSettings(**d.get("masks", {})),
            prompts_per_concept=d.get("prompts_per_concept"),
            cfr_scale_squared=d.get("cfr_scale_squared", True),
            precision=d.get("precision", "auto"),
        )
