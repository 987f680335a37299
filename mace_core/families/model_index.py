"""Where a model comes from (``tiny``, a local folder, a hub id) and its ``model_index.json``:
what a model family is told by, with the small JSON files of its components.

Reading them loads no weights, so a model that no family supports is refused before
anything heavy is read. A local folder is read in place; a hub id's files come one by
one through ``huggingface_hub.hf_hub_download`` (only ``model_index.json``, and a JSON
file of a component where a family needs one to tell itself from a family of the same
pipeline class: SD 1.x and 2.x are both a StableDiffusionPipeline).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mace_core.errors import ModelLoadError
from mace_core.pretrained import looks_like_path

TINY_MODEL = "tiny"  # the built-in tiny random model (each family builds its own; ``tiny`` is sd1)


def resolve_source(model: str) -> tuple[str, bool]:
    """(path or hub id, is_local). Local folders are checked here so errors name them."""
    if not looks_like_path(model):
        return model, False
    local = Path(model).expanduser()
    if local.exists() and not local.is_dir():
        # e.g. an erasure file given as --model: it exists, so "no such folder" would mislead.
        raise ModelLoadError(f"model {model!r}: a file, not a diffusers pipeline folder")
    if not local.is_dir():
        raise ModelLoadError(f"model {model!r}: no such folder")
    if not (local / "model_index.json").is_file():
        raise ModelLoadError(f"model {model!r}: not a diffusers pipeline folder (no model_index.json)")
    if not os.access(local / "model_index.json", os.R_OK):
        raise ModelLoadError(f"model {model!r}: model_index.json is not readable")
    return str(local), True


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


@dataclass
class ModelIndex:
    """``model_index.json`` of ``model`` and, on demand, other JSON files of its folder."""

    model: str  # as the user named it (errors name it)
    source: str  # local folder or hub id
    is_local: bool
    index: dict[str, Any]
    revision: str | None = None  # a hub id's commit to read at (None: its latest)
    _cache: dict[str, dict[str, Any] | None] = field(default_factory=dict, repr=False)

    @classmethod
    def read(cls, model: str, revision: str | None = None) -> ModelIndex:
        """``revision``: a hub id's commit, so that its files are read from the same commit as
        what else is read of it (its files' metadata); ignored for a local folder."""
        source, is_local = resolve_source(model)
        out = cls(model, source, is_local, {}, revision)
        index = out.json("model_index.json")
        if index is None:
            raise ModelLoadError(f"model {model!r}: not a diffusers pipeline (no model_index.json)")
        if not isinstance(index.get("_class_name"), str):
            raise ModelLoadError(f"model {model!r}: model_index.json names no pipeline class (_class_name)")
        out.index = index
        return out

    @property
    def class_name(self) -> str:
        """The diffusers pipeline class, e.g. ``StableDiffusionPipeline``."""
        return str(self.index["_class_name"])

    def json(self, path: str) -> dict[str, Any] | None:
        """The JSON object at ``path`` inside the pipeline folder, None where there is no such file."""
        if path not in self._cache:
            self._cache[path] = self._read(path)
        return self._cache[path]

    def _read(self, path: str) -> dict[str, Any] | None:
        if self.is_local:
            file = os.path.join(self.source, path)
            if not os.path.isfile(file):
                return None
        else:
            file = self._download(path)
            if file is None:
                return None
        try:
            with open(file, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelLoadError(f"model {self.model!r}: {path} cannot be read: {_first_line(e)}") from None
        if not isinstance(data, dict):
            raise ModelLoadError(f"model {self.model!r}: {path} is not a JSON object")
        return data

    def _download(self, path: str) -> str | None:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import RemoteEntryNotFoundError

        # Read at call time (huggingface_hub reads HF_HUB_OFFLINE once, when imported).
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        try:
            return hf_hub_download(self.source, path, revision=self.revision, local_files_only=offline)
        except RemoteEntryNotFoundError:  # the repository has no such file
            return None
        except Exception as e:  # offline, no such repo, auth: many kinds
            raise ModelLoadError(
                f"model {self.model!r}: {path} cannot be fetched: {_first_line(e)}"
            ) from None
