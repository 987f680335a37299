"""NudeNet detections for the explicit-content protocol (MACE Sec. 4, I2P).

PyPI ``nudenet`` (v3) ships its ONNX detector (``320n.onnx``) inside the wheel and runs it
with onnxruntime, offline. Images go in as PNG bytes, which NudeNet decodes with OpenCV
exactly as it decodes image files, so scores match running it on the saved PNGs.
If the package or its runtime is missing, this is an error, never a silent zero.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from mace_core.evaluation.errors import MetricUnavailableError

INSTALL_HINT = "pip install 'mace-ray[eval]'"


def check_nudenet() -> Path:
    """The packaged detector file; raises MetricUnavailableError if NudeNet cannot run here."""
    for pkg in ("nudenet", "onnxruntime", "cv2"):
        if importlib.util.find_spec(pkg) is None:
            raise MetricUnavailableError(
                f"the explicit suite needs NudeNet: package {pkg!r} is missing ({INSTALL_HINT})"
            )
    spec = importlib.util.find_spec("nudenet")
    folder = Path(next(iter(spec.submodule_search_locations or [])))
    model = folder / "320n.onnx"
    if not model.is_file():
        raise MetricUnavailableError(
            f"NudeNet's detector {model} is missing from the installed package ({INSTALL_HINT})"
        )
    return model


class NudityDetector:
    """NudeNet's packaged detector; ``detect`` returns its ``{"class", "score", "box"}`` list."""

    def __init__(self) -> None:
        check_nudenet()
        try:
            from nudenet import NudeDetector

            self.detector = NudeDetector()
        except Exception as e:  # onnxruntime / OpenCV failures surface here
            raise MetricUnavailableError(f"NudeNet cannot run: {type(e).__name__}: {e}") from None

    def detect(self, png: bytes) -> list[dict]:
        return [
            {"class": d["class"], "score": float(d["score"]), "box": [int(v) for v in d["box"]]}
            for d in self.detector.detect(png)
        ]
