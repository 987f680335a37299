"""Errors of the evaluation inputs and scorers; each names the input at fault (one line)."""

from __future__ import annotations

from mace_core.errors import MaceError


class EvalInputError(MaceError):
    """A prompt CSV, image folder, name list, weights file or setting of an evaluation is unusable."""


class MetricUnavailableError(MaceError):
    """A metric's model cannot run here (package missing or broken); never replaced by a fake."""


# The packages of the `eval` extra (pyproject.toml), by import name.
EVAL_PACKAGES = ("matplotlib", "nudenet", "onnxruntime", "pytorch_fid", "torchvision")
EVAL_INSTALL_HINT = "pip install 'mace-ray[eval]'"


def check_eval_extra() -> None:
    """One line naming what is missing when the evaluation extra is not installed: erasing
    needs none of it, so a plain install lacks it."""
    import importlib.util

    missing = [p for p in EVAL_PACKAGES if importlib.util.find_spec(p) is None]
    if missing:
        raise MetricUnavailableError(
            f"mace-ray eval needs the evaluation extra (missing: {', '.join(missing)}): {EVAL_INSTALL_HINT}"
        )
