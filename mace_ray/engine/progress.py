"""Showing progress inside a stage: tqdm bars on a terminal, plain lines everywhere else.

A worker gets a ``StageProgress`` per job and hands its ``update`` to mace_core as the
``Progress`` callback. On this process's terminal (the local executor, run by hand) the
units are tqdm bars. Anywhere else the output is read later, as a file: a Ray worker's
output goes to the driver and from there to ``ray job logs``, where a redrawn bar becomes
every one of its states, twice, with escape codes and blank lines. There each state is one
plain line, labelled with the worker and the job's concepts: when a kind of unit finishes
and at most every ``every_s`` seconds in between.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from mace_ray.engine.logs import progress_line


def worker_label() -> str:
    """This Ray actor as its pool names it in task names (``w0`` for ``mace-worker-<session>-0``)."""
    import ray

    name = ray.get_runtime_context().get_actor_name() or ""
    index = name.rsplit("-", 1)[-1]
    return f"w{index}" if index.isdigit() else name


class StageProgress:
    """The progress of one job (``label``: its stage and concepts, e.g. ``train[dog-1a2b+3]``),
    one line or bar per kind of unit (image steps, masks, train steps)."""

    def __init__(
        self, label: str, enabled: bool = True, under_ray: bool = False, every_s: float = 30.0
    ) -> None:
        self.label = f"{worker_label() if enabled and under_ray else ''} {label}".strip()
        self.enabled = enabled
        self.drawn = enabled and not under_ray and sys.stderr.isatty()  # bars, else lines
        self.every_s = every_s
        self.bars: dict[str, tuple[Any, int, int]] = {}  # what -> bar, its total, units shown
        self.started = self.last_line = time.monotonic()

    def update(self, what: str, done: int, total: int) -> None:
        """The ``mace_core.progress.Progress`` callback."""
        if not self.enabled:
            return
        if self.drawn:
            self._draw(what, done, total)
            return
        now = time.monotonic()
        if done >= total or now - self.last_line >= self.every_s:
            progress_line(f"{self.label}: {what} {done}/{total} ({now - self.started:.1f}s)")
            self.last_line = now

    def _draw(self, what: str, done: int, total: int) -> None:
        bar, shown_total, shown = self.bars.get(what, (None, 0, 0))
        if bar is None or shown_total != total:  # another chunk of units: another bar
            if bar is not None:
                bar.close()
            from tqdm.auto import tqdm

            bar, shown = tqdm(total=total, desc=f"{self.label} {what}"), 0
        bar.update(done - shown)
        self.bars[what] = (bar, total, done)
        if done >= total:
            bar.close()
            del self.bars[what]

    def close(self) -> None:
        for bar, _, _ in self.bars.values():
            bar.close()
        self.bars.clear()
