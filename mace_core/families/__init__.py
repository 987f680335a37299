"""Model families: which kind of pipeline a model is, and everything MACE does that depends on it.

Every module of this package that defines ``FAMILY`` (a ``base.ModelFamily``) is a
family: adding one (e.g. ``sdxl.py``) needs no change anywhere else. A model is matched
from its ``model_index.json`` before any weights are read, a loaded pipeline from its
class and components; exactly one family must recognise it.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import lru_cache
from typing import Any

from mace_core.errors import ModelLoadError
from mace_core.families.base import ModelFamily
from mace_core.families.model_index import TINY_MODEL, ModelIndex


@lru_cache(maxsize=1)
def families() -> tuple[ModelFamily, ...]:
    """Every family, in module-name order (found once, on first use)."""
    found = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        family = getattr(importlib.import_module(f"{__name__}.{info.name}"), "FAMILY", None)
        if family is not None:
            found.append(family)
    return tuple(found)


def family_named(name: str) -> ModelFamily:
    for family in families():
        if family.name == name:
            return family
    raise ValueError(f"unknown model family {name!r} (known: {', '.join(f.name for f in families())})")


def supported() -> str:
    """The pipeline classes families load, with the families of each: for error messages."""
    by_class: dict[str, list[str]] = {}
    for f in families():
        by_class.setdefault(f.pipeline_class, []).append(f.name)
    return ", ".join(f"{cls} ({', '.join(names)})" for cls, names in sorted(by_class.items()))


def _one(matches: list[ModelFamily], what: str) -> ModelFamily:
    if len(matches) > 1:  # two families claiming a model is a bug in them, not the user's fault
        raise RuntimeError(f"{what} is recognised by several families: {', '.join(f.name for f in matches)}")
    return matches[0]


def family_for(model: str) -> ModelFamily:
    """The family of ``tiny`` (sd1), a local pipeline folder or a hub id, from its
    model_index.json (and small JSON files of its components): no weights are read.

    A pipeline class no family supports, or a model of a supported class that no family
    recognises, is a one-line ModelLoadError naming the model.
    """
    if model == TINY_MODEL:
        return family_named("sd1")
    index = ModelIndex.read(model)
    candidates = [f for f in families() if f.pipeline_class == index.class_name]
    if not candidates:
        raise ModelLoadError(
            f"model {model!r} is a {index.class_name}, which mace-ray does not support"
            f" (supported: {supported()})"
        )
    matches = [f for f in candidates if f.recognises(index)]
    if not matches:
        raise ModelLoadError(
            f"model {model!r} is a {index.class_name} of no supported family"
            f" ({'; '.join(f.description for f in candidates)})"
        )
    return _one(matches, f"model {model!r}")


def family_of_pipeline(pipe: Any) -> ModelFamily:
    """The family of a loaded pipeline, from its class and components."""
    matches = [f for f in families() if f.recognises_pipeline(pipe)]
    if not matches:
        raise ModelLoadError(
            f"a {type(pipe).__name__} pipeline is of no supported model family (supported: {supported()})"
        )
    return _one(matches, f"a {type(pipe).__name__} pipeline")
