"""What the storage layouts share (mace_ray/erase/layout.py, audit_layout.py, eval_layout.py).

- ``safe_part``: the check that an id, slug or name may be one part of a key;
- ``Under``: a key at a fixed path under a layout's ``root``, declared in one line;
- ``ReportFolder``: a job folder that ends in report.json, summary.md and plots/ (audits,
  evals; mace_ray/engine/report_files.py writes them).
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, overload

# Ids, slugs and names are made from [a-z0-9-] only (ids are hashes, slugs come from
# concept_slug()), so a key built from them can never leave its folder; checked again where
# each key is made.
SAFE_PART = re.compile(r"^[a-z0-9][a-z0-9-]*$")
PLOT_NAME = re.compile(r"^[a-z0-9_-]+\.png$")


def safe_part(value: str, what: str) -> str:
    """``value`` unchanged if it can be one part of a storage key, else ValueError naming ``what``."""
    if not SAFE_PART.match(value):
        raise ValueError(f"unsafe {what} {value!r}")
    return value


class Under:
    """A key at a fixed path under its layout's ``root``: ``report = Under("report.json")``
    reads as ``f"{layout.root}/report.json"``. The layouts are tables of such keys, so each
    is declared once, by its path, instead of as a property that spells out the root."""

    def __init__(self, path: str) -> None:
        self.path = path

    @overload
    def __get__(self, layout: None, owner: type | None = None) -> Under: ...
    @overload
    def __get__(self, layout: object, owner: type | None = None) -> str: ...
    def __get__(self, layout: Any, owner: type | None = None) -> Under | str:
        if layout is None:  # looked up on the class (dataclasses, help()): the declaration
            return self
        return f"{layout.root}/{self.path}"


@dataclass(frozen=True)
class ReportFolder(ABC):
    """A job's folder whose result is a report: report.json, summary.md and plots/<name>.png.
    Subclasses name the folder (``root``) from their own id field."""

    report = Under("report.json")
    summary = Under("summary.md")

    @property
    @abstractmethod
    def root(self) -> str: ...

    def plot(self, name: str) -> str:
        if not PLOT_NAME.match(name):
            raise ValueError(f"unsafe plot name {name!r}")
        return f"{self.root}/plots/{name}"
