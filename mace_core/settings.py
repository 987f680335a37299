"""Settings of an erase run: frozen dataclasses that round-trip to JSON.

Weights of the closed forms are on a *per-token mean* scale: each sum of outer
products is divided by its token count, so a weight of 1 gives the prior the same
emphasis as the mapping term whatever the size of the caption file or the number of
concepts. The paper's raw weights (applied to plain sums) relate to ours as::

    a_raw = a * N_f / N_p        (prior, CFR; N_f aligned concept tokens, N_p prior tokens)
    w_raw = a * w * N_f / N_d    (domain set, N_d its tokens)
    r_raw = r * N_f              (ridge)

and likewise for the fusion with N_F = all concept tokens. Every run's report records
N_f, N_F, N_p and N_d together with the raw values, so a paper setting can be read off
or reproduced by choosing a, w and r.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from mace_core.concepts import ConceptType


@dataclass(frozen=True)
class ClosedFormSettings:
    """Weights of one closed form (CFR Eq. 2 or fusion Eq. 7), per-token mean scale."""

    prior_weight: float = 1.0
    domain_weight: float = 1.0
    ridge: float = 1e-2

    def __post_init__(self) -> None:
        for name in ("prior_weight", "domain_weight", "ridge"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class TrainDefaults:
    lr: float
    steps: int
    cfis: bool
    whole_image_masks: bool


# MACE.md, "Hyper-parameters of the paper's experiments".
TYPE_DEFAULTS: dict[ConceptType, TrainDefaults] = {
    ConceptType.OBJECT: TrainDefaults(lr=1e-5, steps=50, cfis=True, whole_image_masks=False),
    ConceptType.CELEBRITY: TrainDefaults(lr=1e-4, steps=50, cfis=True, whole_image_masks=False),
    ConceptType.STYLE: TrainDefaults(lr=1e-4, steps=50, cfis=True, whole_image_masks=True),
    ConceptType.EXPLICIT: TrainDefaults(lr=1e-5, steps=120, cfis=False, whole_image_masks=False),
}


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

    def __post_init__(self) -> None:
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
    # Number of templates per concept used for the statistics and training prompts.
    prompts_per_concept: int | None = None
    # "auto": on CUDA, fp16 autocast for generation and bf16 autocast for training (LoRA
    # weights and optimizer state stay fp32); on CPU everything fp32. "fp32": fp32 everywhere.
    precision: str = "auto"

    def __post_init__(self) -> None:
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
            precision=d.get("precision", "auto"),
        )
