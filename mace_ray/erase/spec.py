"""What every worker of an erase run is built from (``RunSpec``: small and picklable), and the
fingerprint check around loading the run's model (``load_checked``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from mace_core.concepts import Concept, ConceptType
from mace_core.fingerprint import expect_fingerprint
from mace_core.settings import EraseSettings
from mace_ray.erase.layout import DataLayout, RunLayout, data_key
from mace_ray.storage.lease import LeaseRef
from mace_ray.storage.resolve import Sources

T = TypeVar("T")


@dataclass(frozen=True)
class RunSpec:
    """What every worker of a run needs to know; small and picklable."""

    run_id: str
    model: str
    output: str
    settings: EraseSettings
    prior_key: str  # cache key of the prior statistics (text encoder + captions)
    # The model's fingerprint when the run started: a worker that finds other weights refuses.
    model_fingerprint: str = ""
    # The concept type whose paper configuration sets the closed-form weights left at None.
    profile: ConceptType = ConceptType.OBJECT
    s3_endpoint: str | None = None
    device: str | None = None
    metrics: str = "none"  # "ray" inside Ray actors
    progress: bool = True  # bars and progress lines inside a job (--quiet: none)
    method: str = "mace"  # "cfr": closed-form refinement only (no images, masks or LoRAs)
    # The driver's lease: open_output checks it before every write of the worker.
    lease: LeaseRef | None = None

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.run_id)

    def data_layout(self, concept: Concept) -> DataLayout:
        """Where the concept's images and masks are shared between runs (``data_key``)."""
        return DataLayout(data_key(self.model_fingerprint or f"model:{self.model}", concept, self.settings))


def load_checked(spec: RunSpec, sources: Sources, load: Callable[[], T]) -> T:
    """``load()`` the run's model, refused if its files are not the ones the run
    fingerprinted: checked before and after loading, so a model replaced while it loads is
    caught too (a worker that starts late, or restarts, never mixes in other weights).
    ``sources``: the worker's (one S3 client per bucket for the checks and the fetch)."""
    if not spec.model_fingerprint:
        return load()

    def check() -> None:
        expect_fingerprint(spec.model, spec.model_fingerprint, sources.fingerprint(spec.model))

    check()
    out = load()
    check()
    return out
