"""Progress inside a long step: a callback the orchestration gives, the method calls.

``Progress(what, done, total)`` says that ``done`` of ``total`` units of ``what`` (denoising
steps of a batch's images, masks, LoRA training steps) are finished. mace_core only calls it;
how it is shown (a tqdm bar, Ray's tqdm_ray, log lines) is the caller's business.
"""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str, int, int], None]


def no_progress(what: str, done: int, total: int) -> None:
    """The default: nothing is shown."""
