"""Showing progress inside a stage: tqdm bars, Ray's tqdm_ray in actors, and log lines.

A worker gets a ``StageProgress`` per job (``for_job``) and hands its ``update`` to mace_core
as the ``Progress`` callback. Inside a Ray actor the bars are ``ray.experimental.tqdm_ray``
bars, which Ray draws in the driver's output (``ray job logs`` included); in a local process
they are tqdm bars on stderr. Either way a log line says where the job is at least every
``every_s`` seconds, for logs that keep no bars.
"""

from __future__ import annotations

import logging
import time
from typing import Any

log = logging.getLogger("mace_ray")


class StageProgress:
    """One bar per kind of unit (image steps, masks, train steps) of one job."""

    def __init__(
        self, label: str, enabled: bool = True, under_ray: bool = False, every_s: float = 30.0
    ) -> None:
        self.label = label
        self.enabled = enabled
        self.under_ray = under_ray
        self.every_s = every_s
        self.bars: dict[str, tuple[Any, int, int]] = {}  # what -> bar, its total, units shown
        self.last_line = time.monotonic()

    def _bar(self, what: str, total: int) -> tuple[Any, int, int]:
        entry = self.bars.get(what)
        if entry is None or entry[1] != total:
            if entry is not None:
                entry[0].close()
            if self.under_ray:
                from ray.experimental.tqdm_ray import tqdm
            else:
                from tqdm.auto import tqdm
            entry = self.bars[what] = (tqdm(total=total, desc=f"{self.label} {what}"), total, 0)
        return entry

    def update(self, what: str, done: int, total: int) -> None:
        """The ``mace_core.progress.Progress`` callback."""
        if not self.enabled:
            return
        bar, _, shown = self._bar(what, total)
        bar.update(done - shown)
        self.bars[what] = (bar, total, done)
        if done >= total:
            bar.close()
            del self.bars[what]
        if time.monotonic() - self.last_line >= self.every_s:
            log.info("%s: %s %d/%d", self.label, what, done, total)
            self.last_line = time.monotonic()

    def close(self) -> None:
        for bar, _, _ in self.bars.values():
            bar.close()
        self.bars.clear()
