"""Celebrity recognition for the celebrities protocol (MACE Sec. 4): top-1 name per image.

The paper used the GIPHY Celebrity Detector, which is not packaged; the default here is CLIP
zero-shot classification over the suite's names ("a photo of {name}"). Any other recogniser
plugs in as ``module:factory``: ``factory(names=[...], device=torch.device)`` must return an
object with ``predict(images: list[np.ndarray]) -> list[str]`` (one of ``names``, or any other
string for "nobody").
"""

from __future__ import annotations

import importlib
from typing import Protocol

import numpy as np
import torch

from mace_core.evaluation.clip_model import ClipModel
from mace_core.evaluation.errors import EvalInputError
from mace_core.evaluation.metrics import zero_shot_predict
from mace_core.evaluation.settings import CLIP_RECOGNIZER

NAME_TEMPLATE = "a photo of {}"


class Recognizer(Protocol):
    def predict(self, images: list[np.ndarray]) -> list[str]: ...


class ClipZeroShotRecognizer:
    """argmax over names of cos(CLIP(image), CLIP("a photo of {name}"))."""

    def __init__(self, names: list[str], clip: ClipModel, template: str = NAME_TEMPLATE) -> None:
        if not names:
            raise EvalInputError("a recogniser needs at least one name")
        self.names = list(names)
        self.clip = clip
        self.text = clip.text_embeddings([template.format(n) for n in self.names])

    def predict(self, images: list[np.ndarray]) -> list[str]:
        idx = zero_shot_predict(self.clip.image_embeddings(images), self.text)
        return [self.names[i] for i in idx.tolist()]


def _factory(spec: str):
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise EvalInputError(f"recogniser {spec!r}: expected 'clip' or 'module:factory'")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise EvalInputError(f"recogniser {spec!r} cannot be imported: {e}") from None


def check_recognizer(spec: str) -> None:
    """Fail early (on the driver) for a recogniser spec that cannot be imported."""
    if spec != CLIP_RECOGNIZER:
        _factory(spec)


def load_recognizer(spec: str, names: list[str], clip: ClipModel, device: torch.device) -> Recognizer:
    if spec == CLIP_RECOGNIZER:
        return ClipZeroShotRecognizer(names, clip)
    rec = _factory(spec)(names=list(names), device=device)
    if not callable(getattr(rec, "predict", None)):
        raise EvalInputError(f"recogniser {spec!r} returned an object without predict(images)")
    return rec
