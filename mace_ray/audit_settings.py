"""What ``mace-ray audit`` is asked to do: ``AuditRequest``, the audit's method settings
(``mace_core.audit.settings.AuditSettings``, every attack's group included) beside where and
how the job runs. Its fields carry their command-line metadata, as ``EraseRequest`` and
``EvalRequest``'s do (mace_ray/run_settings.py); mace_ray/cli_build.py builds the command.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mace_core.audit.attacks import ALL, attack_names, parse_attacks
from mace_core.audit.settings import AuditSettings
from mace_core.concepts import ConceptType
from mace_core.options import Panel, coerce_choices, group, option, setting
from mace_ray.run_settings import ADDRESS, DEVICE, EXECUTOR, GPUS_PER_WORKER, S3_ENDPOINT, VERBOSE, Executor


@dataclass(frozen=True)
class AuditRequest:
    model: str = field(
        metadata=option(
            "The erased model to audit: an erase run's folder (runs/<run_id>: its original model, "
            "concepts and stored images are used), its final/pipeline folder, a diffusers folder, "
            "a hub id or 'tiny'.",
            argument=True,
        )
    )
    # None: the erase run's concepts
    concept_file: str | None = field(
        default=None,
        metadata=option(
            "Concept file: 'text | type | anchor | aliases | descriptions' per line, aliases and "
            "descriptions ';'-separated (default: the erase run's concepts).",
            name="concepts",
            argument=True,
        ),
    )
    # None: the erase run's --model
    original: str | None = setting(
        None,
        "The model before erasure: hub id, diffusers folder or 'tiny' (default: the erase run's model).",
        panel=Panel.MODEL,
    )
    attacks: str = setting(
        ALL,
        f"Attacks to run: {ALL} or a comma-separated list of {', '.join(attack_names())}.",
        panel=Panel.ATTACKS,
    )
    output: str = setting(
        "mace-runs", "Where audits/ is written: a folder or s3://bucket/prefix.", panel=Panel.MODEL
    )
    default_type: ConceptType = setting(
        ConceptType.OBJECT, "Type of concept-file lines without one.", name="type", panel=Panel.MODEL
    )
    settings: AuditSettings = field(default_factory=AuditSettings, metadata=group())
    executor: Executor = field(default=Executor.RAY, metadata=EXECUTOR)
    address: str | None = field(default=None, metadata=ADDRESS)
    workers: int | None = setting(
        None, "Audit workers (default: one per GPU of the cluster, else 1).", min=1, panel=Panel.CLUSTER
    )
    gpus_per_worker: float | None = field(default=None, metadata=GPUS_PER_WORKER)
    device: str | None = field(default=None, metadata=DEVICE)
    s3_endpoint: str | None = field(default=None, metadata=S3_ENDPOINT)
    resume: bool = setting(
        True, "Reuse the results of an earlier audit with the same inputs.", panel=Panel.RUN
    )
    progress: bool = field(default=True, metadata=VERBOSE)

    def __post_init__(self) -> None:
        coerce_choices(self, {"executor": (Executor, "executor")})
        parse_attacks(self.attacks)  # an unknown name is a ValueError: one line, exit 2
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")

    @property
    def attack_list(self) -> tuple[str, ...]:
        return parse_attacks(self.attacks)
