"""``--model s3://bucket/path/to/diffusers-folder``: fetch the folder into a local cache.

A cached copy is keyed by the URI and the ETag and size of every file, so a changed model
is fetched again and an unchanged one never is. Copies are complete or absent: a download
goes to a temporary sibling and is renamed into place, and a folder that changed while it
was being fetched is not kept. Old copies are not pruned (delete the cache folder freely).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Collection
from pathlib import Path

from mace_core.errors import ModelLoadError
from mace_core.fingerprint import (
    DENOISERS,
    REQUIRED,
    SECOND_TEXT,
    TEXT_SIDE,
    ModelFingerprint,
    combine,
    is_fingerprinted,
    model_fingerprint,
)
from mace_ray.storage.s3 import S3Storage
from mace_ray.storage.s3_client import S3Location, parse_s3_url


def default_cache_dir() -> Path:
    """MACE_MODEL_CACHE, else $XDG_CACHE_HOME/mace-ray/models, else ~/.cache/mace-ray/models."""
    if os.environ.get("MACE_MODEL_CACHE"):
        return Path(os.environ["MACE_MODEL_CACHE"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "mace-ray" / "models"


# What the driver needs to validate prompts and fingerprint a model (load_text_components);
# SDXL's second text encoder (SECOND_TEXT) is fetched where the folder has it, never required.
TEXT_COMPONENTS = TEXT_SIDE


def is_remote(model: str) -> bool:
    return model[:5].lower() == "s3://"


def _open_remote(model: str, s3_endpoint: str | None) -> tuple[S3Storage, str, S3Location]:
    loc = parse_s3_url(model)
    if not loc.prefix:
        raise ModelLoadError(f"model {model!r}: name a folder inside the bucket (s3://bucket/path/to/model)")
    parent, _, name = loc.prefix.rpartition("/")
    storage = S3Storage(f"s3://{loc.bucket}/{parent}" if parent else f"s3://{loc.bucket}", s3_endpoint)
    if not storage.exists(name):
        raise ModelLoadError(f"model {model!r}: no such folder (or its upload did not complete)")
    return storage, name, loc


def _listing(
    model: str, storage: S3Storage, name: str, include: Collection[str] | None, components: Collection[str]
) -> dict[str, list]:
    """{path in the folder: [ETag, size]}; the folder must be a pipeline with each of
    ``components`` but the optional ones."""
    files = {e.rel: [e.etag, e.size] for e in storage.dir_entries(name, include)}
    if "model_index.json" not in files:
        raise ModelLoadError(f"model {model!r}: not a diffusers pipeline folder (no model_index.json)")
    for part in (c for c in components if c not in SECOND_TEXT):
        if not any(rel.startswith(part + "/") for rel in files):
            raise ModelLoadError(f"model {model!r}: no {part}/ in the pipeline folder")
    if include is None and not any(rel.startswith(d + "/") for d in DENOISERS for rel in files):
        raise ModelLoadError(f"model {model!r}: no unet/ or transformer/ in the pipeline folder")
    return files


def fingerprint_model(model: str, s3_endpoint: str | None = None) -> ModelFingerprint:
    """The model's fingerprint (``mace_core.fingerprint``). An s3:// folder is fingerprinted
    from its listing (ETag and size of every file that counts), without downloading it: S3
    gives every rewritten object a new ETag."""
    if not is_remote(model):
        return model_fingerprint(model)
    storage, name, _ = _open_remote(model, s3_endpoint)
    files = _listing(model, storage, name, None, REQUIRED)
    return combine({rel: f"s3:{etag}:{size}" for rel, (etag, size) in files.items() if is_fingerprinted(rel)})


def resolve_model(
    model: str,
    s3_endpoint: str | None = None,
    *,
    cache_dir: Path | None = None,
    components: Collection[str] | None = None,
) -> str:
    """``model`` itself unless it is an s3:// URL; then the local path of a cached copy.

    ``components``: only these subfolders (and model_index.json), e.g. TEXT_COMPONENTS for
    a driver that never loads the UNet; default: the whole pipeline. Errors name ``model``:
    ModelLoadError when the folder is missing or not a diffusers pipeline; StorageError
    for credentials, missing buckets and the like.
    """
    if not is_remote(model):
        return model
    storage, name, loc = _open_remote(model, s3_endpoint)
    include = None if components is None else {"model_index.json", *components}
    files = _listing(model, storage, name, include, components or ())

    identity = hashlib.sha256(json.dumps({"uri": loc.url, "files": files}, sort_keys=True).encode())
    root = cache_dir or default_cache_dir()
    dest = root / identity.hexdigest()[:32]
    if dest.is_dir():
        return str(dest)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        storage.get_dir(name, tmp, include)
        now = {e.rel: [e.etag, e.size] for e in storage.dir_entries(name, include)}
        if now != files:
            raise ModelLoadError(f"model {model!r} changed while it was being downloaded; try again")
        try:
            os.replace(tmp, dest)
        except OSError:
            if not dest.is_dir():  # another process may have put the same copy in place
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(dest)
