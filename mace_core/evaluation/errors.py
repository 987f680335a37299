"""Errors of the evaluation inputs and scorers; each names the input at fault (one line)."""

from __future__ import annotations

from mace_core.errors import MaceError


class EvalInputError(MaceError):
    """A prompt CSV, image folder, name list, weights file or setting of an evaluation is unusable."""


class MetricUnavailableError(MaceError):
    """A metric's model cannot run here (package missing or broken); never replaced by a fake."""
