"""An eval's or audit's report as files: report.json beside its summary.md and plots.

Both write the same trio under their own folder, and report.json lists where the others
are (``output``), so one function writes them, the report last: a report.json that exists
names files that exist.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from mace_ray.storage.base import Storage, write_json


class ReportLayout(Protocol):
    """The keys a report's files take (mace_ray/eval/layout.py, mace_ray/audit/layout.py)."""

    @property
    def root(self) -> str: ...
    @property
    def report(self) -> str: ...
    @property
    def summary(self) -> str: ...
    def plot(self, name: str) -> str: ...


def write_report_files(
    storage: Storage,
    layout: ReportLayout,
    report: dict[str, Any],
    plots: Callable[[dict[str, Any]], dict[str, bytes]],
    summary: Callable[[dict[str, Any]], str],
    **outputs: Any,
) -> dict[str, Any]:
    """Plots (name -> PNG), the Markdown summary, then report.json with their keys in
    ``output`` (plus ``outputs``: other files the run wrote); returns the report."""
    pngs = plots(report)
    report["output"] = {
        "root": f"{storage.url}/{layout.root}",
        "report": layout.report,
        "summary": layout.summary,
        **outputs,
        "plots": sorted(pngs),
    }
    for name, png in pngs.items():
        storage.write_bytes(layout.plot(name), png)
    storage.write_bytes(layout.summary, summary(report).encode())
    write_json(storage, layout.report, report)
    return report
