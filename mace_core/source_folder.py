"""A model's own files: the local folder an erased model is copied from, and the
fingerprint of those files (``model_fingerprint``; without a download for a hub id).

- a local diffusers folder: itself, every file in it (hidden ones, such as a download
  tool's ``.cache/``, aside);
- a hub id: its snapshot in the Hugging Face cache, fetched where needed (offline: what is
  cached), with ``model_index.json`` and the folder of every component it names (the
  safety checker and feature extractor included, which the loaders skip), without the
  files no default load reads (``mace_core.weight_files``: ``.bin``, ``.msgpack``, ...,
  and variants such as ``*.fp16.safetensors``): those are not downloaded for a copy;
- ``tiny``: the built-in tiny pipeline as ``save_pretrained`` writes it (fp32 safetensors,
  no safety checker), saved once into a scratch folder: it has no folder of its own.

An ``s3://`` model is first fetched into the model cache by mace_ray (its ``Sources``),
whose local copy is then a local folder here.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mace_core.errors import ModelLoadError
from mace_core.families.model_index import TINY_MODEL, ModelIndex, resolve_source
from mace_core.fingerprint import (
    COMPONENTS,
    ModelFingerprint,
    file_digest,
    folder_fingerprint,
    is_fingerprinted,
    pipeline_fingerprint_of,
    tiny_fingerprint,
)
from mace_core.weight_files import NOT_LOADED


@dataclass(frozen=True)
class SourceFolder:
    """A local pipeline folder and the files of it that make the model (relative paths)."""

    path: Path
    files: list[str]


def folder_files(folder: Path) -> list[str]:
    """Every file under ``folder`` (links followed), relative, sorted; hidden ones left aside."""
    out = []
    for p in folder.rglob("*"):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and not any(part.startswith(".") for part in rel.split("/")):
            out.append(rel)
    return sorted(out)


def named_components(index: dict) -> list[str]:
    """The components a ``model_index.json`` names (``[library, class]``, not ``[null, null]``)."""
    return sorted(
        k
        for k, v in index.items()
        if not k.startswith("_") and isinstance(v, list) and len(v) == 2 and None not in v
    )


def source_folder(model: str, scratch: Path) -> SourceFolder:
    """The files an erased ``model`` is made from (``tiny`` is saved into ``scratch``)."""
    if model == TINY_MODEL:
        from mace_core.families.sd1 import build_tiny_pipeline

        folder = scratch / "tiny"
        build_tiny_pipeline().save_pretrained(str(folder), safe_serialization=True)
        return SourceFolder(folder, folder_files(folder))
    source, is_local = resolve_source(model)
    if is_local:
        return SourceFolder(Path(source), folder_files(Path(source)))
    return hub_snapshot(model)


def _hub_offline() -> bool:
    # Read at call time (huggingface_hub reads HF_HUB_OFFLINE once, when imported).
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def _hub_selection(
    repo_id: str,
    only: Collection[str] | None,
    index: dict[str, Any] | None = None,
    revision: str | None = None,
) -> tuple[list[str], list[str]]:
    """The components of a hub model that are wanted (of ``index``, default: its model_index.json
    at ``revision``), and the hub patterns of their files."""
    index = ModelIndex.read(repo_id, revision).index if index is None else index
    components = [c for c in named_components(index) if only is None or c in only]
    return components, ["model_index.json", *(f"{c}/*" for c in components)]


def _hub_error(repo_id: str, e: Exception) -> ModelLoadError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return ModelLoadError(f"model {repo_id!r}: its files cannot be fetched: {first[:300]}")


def hub_snapshot(repo_id: str, only: Collection[str] | None = None) -> SourceFolder:
    """A hub model's snapshot: model_index.json and every component it names (``only``: those
    of them in ``only``), without the files no default load reads (see the module). Its
    ``files`` are the same online and offline, whatever else the cached snapshot holds."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import filter_repo_objects

    components, allow = _hub_selection(repo_id, only)
    offline = _hub_offline()
    try:
        folder = Path(
            snapshot_download(
                repo_id, allow_patterns=allow, ignore_patterns=NOT_LOADED, local_files_only=offline
            )
        )
    except Exception as e:  # hub errors come in many kinds (offline, missing repo, auth)
        raise _hub_error(repo_id, e) from None
    # The files were chosen by the latest model_index.json, read before the download: a push in
    # between would pair them with another commit's index (its components unfetched).
    if _hub_selection(repo_id, only, ModelIndex.read(str(folder)).index)[0] != components:
        raise ModelLoadError(
            f"model {repo_id!r} changed on the hub while it was downloaded (its model_index.json "
            "names other components now); run the command again"
        )
    # Offline, the snapshot holds whatever was downloaded before: keep the same files as online.
    files = sorted(
        filter_repo_objects(folder_files(folder), allow_patterns=allow, ignore_patterns=NOT_LOADED)
    )
    missing = [c for c in components if not any(f.startswith(c + "/") for f in files)]
    if missing:
        raise ModelLoadError(
            f"model {repo_id!r}: its cached snapshot has no {', '.join(m + '/' for m in missing)}"
            " (download the whole pipeline once, e.g. huggingface-cli download " + repo_id + ")"
        )
    return SourceFolder(folder, files)


def hub_fingerprint(repo_id: str, cache: Path | None = None) -> ModelFingerprint:
    """The fingerprint of a hub model (``mace_core.fingerprint``) without downloading its
    weights: a weights file is stored with Git LFS, whose metadata records its SHA-256 (what
    hashing the file gives), and only the small files (configs, tokenizers) are fetched and
    hashed, at the commit the metadata was read at. The files are those its snapshot would
    hold (the run's components, ``hub_snapshot``), so this is the fingerprint of its snapshot
    or of any copy of its folder. Offline (HF_HUB_OFFLINE): the cached snapshot's."""
    if _hub_offline():
        snapshot = hub_snapshot(repo_id, COMPONENTS)
        return folder_fingerprint(snapshot.path, cache, snapshot.files)
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.utils import filter_repo_objects

    try:
        info = HfApi().model_info(repo_id, files_metadata=True)
    except Exception as e:  # hub errors come in many kinds (offline, missing repo, auth)
        raise _hub_error(repo_id, e) from None
    # Every file at the commit whose metadata was read, model_index.json included.
    _, allow = _hub_selection(repo_id, COMPONENTS, revision=info.sha)
    try:
        listed = {s.rfilename: s for s in info.siblings or []}
        files = filter_repo_objects(sorted(listed), allow_patterns=allow, ignore_patterns=NOT_LOADED)
        entries = {}
        for rel in (f for f in files if is_fingerprinted(f)):
            lfs = listed[rel].lfs
            if lfs is not None and lfs.sha256:
                entries[rel] = str(lfs.sha256)
            else:
                entries[rel] = file_digest(Path(hf_hub_download(repo_id, rel, revision=info.sha)), cache)
    except ModelLoadError:
        raise
    except Exception as e:  # hub errors come in many kinds (offline, missing repo, auth)
        raise _hub_error(repo_id, e) from None
    return pipeline_fingerprint_of(repo_id, entries)


def model_fingerprint(model: str, cache: Path | None = None) -> ModelFingerprint:
    """Fingerprint of ``tiny``, a local pipeline folder, or a hub id.

    A hub id's is ``hub_fingerprint``'s: the same as its snapshot's,
    without downloading its weights.
    """
    if model == TINY_MODEL:
        return tiny_fingerprint()
    source, is_local = resolve_source(model)
    return folder_fingerprint(source, cache) if is_local else hub_fingerprint(model, cache)
