"""What every pool worker does the same way (erase's GPU and text workers, audit and eval
workers): a constructor that cannot fail, a setup() that opens storage, picks the device,
loads the worker's models once and says where it runs, and a teardown that gives the GPU's
cached memory back. The local executor instantiates them directly; Ray runs them as actors.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Generic, Protocol, TypeVar

import torch

from mace_core.models import pick_device
from mace_ray.engine.logs import quiet_libraries
from mace_ray.engine.provenance import where_am_i
from mace_ray.storage.open_store import NamesOutput, open_output


class WorkerSpec(NamesOutput, Protocol):
    """What setup() reads of a worker's spec (RunSpec, AuditSpec, EvalSpec)."""

    @property
    def device(self) -> str | None: ...


S = TypeVar("S", bound=WorkerSpec)


class PoolWorker(ABC, Generic[S]):
    """Subclasses load their models in ``load()`` (with ``self.storage`` and ``self.device``
    set); what it returns is added to setup()'s report of where the worker runs."""

    def __init__(self, spec: S, name: str) -> None:
        # Nothing that can fail on bad input happens here: under Ray, an error in __init__
        # loses its message; setup() reports it like any other call.
        self.spec = spec
        self.name = name

    def setup(self) -> dict[str, Any]:
        """Load the models once; returns where this worker runs (and what ``load()`` adds)."""
        quiet_libraries()
        self.storage = open_output(self.spec)
        self.device = self.choose_device()
        extra = self.load()
        self.where = where_am_i(self.name)
        return {**self.where, **extra}

    def choose_device(self) -> torch.device:
        return pick_device(self.spec.device)

    @abstractmethod
    def load(self) -> dict[str, Any]:
        """The worker's models, once; returns what setup() adds to where it runs."""

    def teardown(self) -> None:
        """Subclasses drop their models first, so that the cache holds what they held."""
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
