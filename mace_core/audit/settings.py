"""Settings of an audit: what every attack shares, and each attack's own group."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from mace_core.audit.attacks import AttackSettings
from mace_core.errors import SettingError
from mace_core.evaluation.settings import GenerationSettings, clip_setting
from mace_core.options import Panel, group, plain, setting


@dataclass(frozen=True)
class AuditSettings:
    seed: int = setting(0, "Seed of every attack's draws and of the images.", panel=Panel.ATTACKS)
    # Wall-clock, not steps: what a GPU hour buys. Split evenly so that no attack starves another.
    budget_s: float | None = setting(
        None,
        "Seconds of attack time per concept, split evenly between its attacks; an attack out of "
        "time stops and reports the steps it reached (default: no limit, the step counts decide).",
        name="budget",
        min=0.0,
        panel=Panel.ATTACKS,
    )
    success_leak: float = setting(
        0.5,
        "An attack succeeds on a concept when its leak reaches this.",
        min=0.0,
        max=1.0,
        panel=Panel.ATTACKS,
    )
    images: int = setting(
        2,
        "Images per attack and per plain prompt, scored for the concept (0: mechanistic figures only).",
        min=0,
        panel=Panel.GENERATION,
    )
    generation: GenerationSettings = field(
        default_factory=GenerationSettings, metadata=group(panel=Panel.GENERATION)
    )
    clip: str | None = clip_setting("CLIP that judges whether an image shows the concept")
    attacks: AttackSettings = field(default_factory=AttackSettings, metadata=group())

    def __post_init__(self) -> None:
        if self.budget_s is not None and not self.budget_s >= 0:
            raise SettingError(f"budget must be >= 0 seconds, got {self.budget_s}")
        if not 0.0 <= self.success_leak <= 1.0:
            raise SettingError(f"success_leak must be in [0, 1], got {self.success_leak}")
        if self.images < 0:
            raise SettingError(f"images must be >= 0, got {self.images}")

    def to_dict(self) -> dict[str, Any]:
        return plain(asdict(self))
