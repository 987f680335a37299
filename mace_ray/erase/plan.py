"""What an erase request runs: ``--method`` and ``--stages`` turned into a stage table
(mace_ray/erase/stages.py), a partial run with every stage its stages need."""

from __future__ import annotations

import logging

from mace_core.errors import SettingError
from mace_ray.engine.stages import Stage
from mace_ray.erase.run import EraseRun
from mace_ray.erase.stages import BY_NAME, CFR_STAGES, ERASE_STAGES

log = logging.getLogger("mace_ray")

# What a stage needs done before it in the same driver (a partial run adds it).
NEEDS: dict[str, tuple[str, ...]] = {
    "text_statistics": (),
    "workers_start": (),
    "data": ("workers_start",),
    "cfr": ("text_statistics", "workers_start"),
    "train": ("cfr",),
    "fusion": ("train",),
    "write": ("fusion",),
    "erasure_report": ("write",),
    "finish": ("erasure_report",),
}
CFR_ONLY = "cfr"


def plan_stages(spec: str, method: str = "mace") -> tuple[str, tuple[Stage[EraseRun], ...]]:
    """``--stages`` of ``--method``: (method, stages to run). ``--method cfr``: closed-form
    refinement only (a different result, so a different run), whole. ``--stages all``: the
    method; else stage names of a MACE run, comma-separated, with what they need: a partial run
    whose artefacts the full run reuses. ``--stages cfr`` alone is the old spelling of
    ``--method cfr``: it still means that, with a warning."""
    text = spec.strip().lower()
    if text == CFR_ONLY:
        log.warning(
            "--stages cfr is deprecated: use --method cfr (for a MACE run stopped after its cfr "
            "stage, name another stage with it: --stages text_statistics,cfr)"
        )
        text, method = "all", CFR_ONLY
    if method == CFR_ONLY:
        if text not in ("", "all"):
            raise SettingError(f"--stages {spec}: --method cfr runs whole; partial runs are of --method mace")
        return CFR_ONLY, CFR_STAGES
    if text in ("", "all"):
        return "mace", ERASE_STAGES
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        valid = ", ".join(["all", *BY_NAME])
        raise SettingError(f"--stages: unknown stage {unknown[0]!r} (valid: {valid})")
    wanted: set[str] = set()

    def add(name: str) -> None:
        if name not in wanted:
            wanted.add(name)
            for need in NEEDS[name]:
                add(need)

    for name in names:
        add(name)
    return "mace", tuple(s for s in ERASE_STAGES if s.name in wanted)


def needs_masker(method: str, stages: tuple[Stage[EraseRun], ...]) -> bool:
    """Whether a run's GPU workers load a masker (at start, so that their batch plan counts its
    memory): those of a MACE run do; a closed-form-only run makes no masks and loads none, and
    a partial run without GPU stages (``--stages text_statistics``) starts no worker."""
    return method == "mace" and any(s.name == "workers_start" for s in stages)
