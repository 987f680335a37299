"""What ``mace-ray audit`` is asked to do: ``AuditRequest``, the audit's method settings
(``mace_core.audit.settings.AuditSettings``, every attack's group included) beside where and
how the job runs. Its fields carry their command-line metadata, as ``EraseRequest`` and
``EvalRequest``'s do (mace_ray/engine/requests.py); mace_ray/cli/build.py builds the command.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mace_core.audit.attacks import ALL, attack_names, parse_attacks
from mace_core.audit.settings import AuditSettings
from mace_core.concepts import ConceptType
from mace_core.options import Panel, argument, group, setting
from mace_ray.engine.requests import WhereItRuns, output_setting, resume_setting


@dataclass(frozen=True)
class AuditRequest(WhereItRuns):
    model: str = argument(
        "The erased model to audit: an erase run's folder (runs/<run_id>: its original model, "
        "concepts and stored images are used), its final/pipeline folder, a diffusers folder, "
        "a hub id or 'tiny'; folders local or s3://."
    )
    # None: the erase run's concepts
    concept_file: str | None = argument(
        "Concept file: 'text | type | anchor | aliases | descriptions' per line, aliases and "
        "descriptions ';'-separated (default: the erase run's concepts).",
        None,
        name="concepts",
    )
    # None: the erase run's --model
    original: str | None = setting(
        None,
        "The model before erasure: hub id, diffusers folder or 'tiny' (default: the erase run's model).",
        panel=Panel.MODEL,
        basic=True,
    )
    attacks: str = setting(
        ALL,
        f"Attacks to run: {ALL} or a comma-separated list of {', '.join(attack_names())}.",
        panel=Panel.ATTACKS,
        basic=True,
    )
    output: str = output_setting("Where audits/ is written")
    default_type: ConceptType = setting(
        ConceptType.OBJECT, "Type of concept-file lines without one.", name="type", panel=Panel.MODEL
    )
    settings: AuditSettings = field(default_factory=AuditSettings, metadata=group())
    resume: bool = resume_setting(
        "Run every attack again (by default the results of an earlier audit with the same inputs are reused)."
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        parse_attacks(self.attacks)  # an unknown name is a ValueError: one line, exit 2

    @property
    def attack_list(self) -> tuple[str, ...]:
        return parse_attacks(self.attacks)
