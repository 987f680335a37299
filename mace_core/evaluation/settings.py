"""The evaluation's settings as the command line declares them: image generation, the CLIP
and the recogniser by name. Kept apart from the code that uses them (generation.py,
clip_model.py, recognition.py), which needs torch: `mace-ray eval --help` builds its options
from this module alone and starts in a fraction of a second.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from mace_core.errors import SettingError
from mace_core.options import Panel, Settings, plain, setting
from mace_core.settings import Precision

# The recogniser of the celebrity and style suites when none is named: zero-shot CLIP.
CLIP_RECOGNIZER = "clip"

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
TINY_CLIP = "tiny"


def clip_setting(role: str) -> Any:
    """The ``--clip`` option of eval and audit (``role``: what the CLIP is for). None: the
    tiny CLIP for tiny models, else DEFAULT_CLIP (the drivers resolve it)."""
    text = f"{role}: hub id, local folder or 'tiny' (default: tiny for tiny models, else {DEFAULT_CLIP})."
    return setting(None, text, panel=Panel.SCORING)


@dataclass(frozen=True)
class GenerationSettings(Settings):
    inference_steps: int = setting(30, "DPM-Solver steps per image.", min=1)
    # Used when a prompt has no guidance of its own (I2P has).
    guidance_scale: float = setting(
        7.5, "CFG scale (in eval, a prompt CSV row's own guidance scale wins).", min=0.0
    )
    resolution: int | None = setting(
        None, "Image size (default: the model's; in eval, a prompt CSV's own size first).", min=8
    )
    # The UNet sees twice as many with CFG.
    batch_size: int = setting(8, "Images per pipeline call.", min=1)
    # fp32 by default: the numbers are the model's, not its fp16 rounding's.
    precision: Precision = setting(
        Precision.FP32, "auto: fp16 pipeline on CUDA, fp32 on CPU; fp32: fp32 everywhere."
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.resolution is not None and self.resolution % 8:
            raise SettingError(f"resolution must be a positive multiple of 8, got {self.resolution}")

    def to_dict(self) -> dict:
        return plain(asdict(self))
