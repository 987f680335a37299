"""Settings of an audit: what every attack shares, and each attack's own group."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from mace_core.audit.attacks import AttackSettings
from mace_core.evaluation.settings import GenerationSettings, clip_setting
from mace_core.options import Panel, Settings, group, plain, seconds, setting


@dataclass(frozen=True)
class AuditSettings(Settings):
    seed: int = setting(0, "Seed of every attack's draws and of the images.", panel=Panel.ATTACKS)
    # Wall-clock, not steps: what a GPU hour buys. Split evenly so that no attack starves another.
    budget_s: float | None = seconds(
        None,
        "Seconds of attack time per concept, split evenly between its attacks; an attack out of "
        "time stops and reports the steps it reached (default: no limit, the step counts decide).",
        "budget",
        Panel.ATTACKS,
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

    def to_dict(self) -> dict[str, Any]:
        return plain(asdict(self))
