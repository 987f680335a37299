"""Typed jobs: one small dataclass per kind of call a worker serves.

A job names the worker method that runs it (``class TrainConcepts(ConceptJob,
method="train")``) and carries its arguments as fields, so a stage builds
``TrainConcepts(batch)`` rather than ``("process", (batch,))``
and a typo is an AttributeError at the point it is made. Jobs over concepts can shrink:
after a worker is lost, ``WorkerPool`` re-queues only the concepts whose completion
marker is not there yet (``ConceptJob.without``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from mace_core.concepts import Concept


@dataclass
class Job:
    """A call on some worker of a pool: ``getattr(worker, method)(*args())``."""

    method: ClassVar[str] = ""  # the worker method, set by each job: class X(Job, method="...")
    label: str = field(default="", kw_only=True)
    # Called on the driver with the job and its result when it finished.
    on_done: Callable[[Any, Any], None] | None = field(default=None, kw_only=True, repr=False)
    attempts: int = field(default=0, kw_only=True)

    def __init_subclass__(cls, method: str = "", **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if method:
            cls.method = method

    def args(self) -> tuple[Any, ...]:
        """The method's positional arguments: the job's own fields, in order."""
        skip = {"label", "on_done", "attempts"}
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip)


@dataclass
class ConceptJob(Job):
    """A job over a batch of concepts, each with its own completion marker."""

    concepts: list[Concept] = field(default_factory=list)

    def without(self, finished: set[str]) -> ConceptJob | None:
        """The same job over the concepts not in ``finished`` (slugs); None if none are left."""
        rest = [c for c in self.concepts if c.slug not in finished]
        return dataclasses.replace(self, concepts=rest) if rest else None


def concept_label(stage: str, concepts: list[Concept]) -> str:
    """'train[dog-1a2b+3]': the stage, the batch's first concept and how many more."""
    return f"{stage}[{concepts[0].slug}+{len(concepts) - 1}]" if concepts else stage
