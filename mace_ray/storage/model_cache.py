"""Remote inputs in a local cache: ``s3://`` folders (a diffusers pipeline, a run's
``final/pipeline``, a detector or segmenter folder) and files (an erasure file, a SAM ``.pth``).

Keyed by content: a copy is keyed by its URL and the ETag and size of every file in it (S3
gives every rewritten object a new ETag), so a changed object is fetched again and an
unchanged one never is; each use lists the folder (or the file) once to know which. Copies
are complete or absent: a download goes to a temporary sibling, is verified and renamed into
place, and a folder that changed while it was being fetched is not kept.

Verified: every file's size against the listing (a committed folder's marker: see
``mace_ray.storage.s3``); a folder or file inside a complete run (``ROOT/runs/<run_id>/...``)
also against the SHA-256 its run recorded in its manifest (``outputs``). What does not match
is never served. Old copies are not pruned (delete the cache folder freely).

Used through ``mace_ray.storage.resolve.Sources`` (one per command or worker), which opens the
clients and calls ``fetch_folder`` / ``fetch_file`` / ``remote_fingerprint``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Collection
from pathlib import Path

from mace_core.errors import ArtefactError, ModelLoadError
from mace_core.fingerprint import (
    DENOISERS,
    REQUIRED,
    SECOND_TEXT,
    TEXT_SIDE,
    ModelFingerprint,
    combine,
    file_sha256,
    is_fingerprinted,
)
from mace_ray.storage.s3 import S3Storage
from mace_ray.storage.s3_folders import NoFolder

Listing = dict[str, list]  # {path in the folder: [ETag, size]}


def default_cache_dir() -> Path:
    """MACE_MODEL_CACHE, else $XDG_CACHE_HOME/mace-ray/models, else ~/.cache/mace-ray/models."""
    if os.environ.get("MACE_MODEL_CACHE"):
        return Path(os.environ["MACE_MODEL_CACHE"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "mace-ray" / "models"


# What the driver needs to validate prompts and fingerprint a model (load_text_components);
# SDXL's second text encoder (SECOND_TEXT) is fetched where the folder has it, never required.
TEXT_COMPONENTS = TEXT_SIDE


def is_remote(spec: str) -> bool:
    return spec[:5].lower() == "s3://"


# A path inside a run folder: ROOT/runs/<run_id>[/REST] (mace_ray.erase.layout.RunLayout;
# tests/test_s3_results.py keeps the two equal). Greedy: the last such part names the run.
RUN_PATH = re.compile(r"^(?:(?P<root>.*)/)?runs/(?P<run_id>[0-9a-f]{16})(?:/(?P<rest>.*))?$")


def split_run(path: str) -> tuple[str, str, str] | None:
    """(ROOT, run id, the rest) of a key, path or URL inside a run folder ``ROOT/runs/<run_id>``
    (the rest '' for the run folder itself, ROOT '' for a relative ``runs/<run_id>``); None
    for anything else."""
    m = RUN_PATH.match(path.rstrip("/"))
    if m is None:
        return None
    return m["root"] or "", m["run_id"], m["rest"] or ""


def recorded_sums(storage: S3Storage, key: str) -> dict[str, str] | None:
    """{path under ``key`` ('' for ``key`` itself): SHA-256} as the complete run that holds
    ``key`` recorded them in its manifest (``outputs``); None when ``key`` is not inside a
    run, or its run is not complete or records none (sizes are still checked)."""
    parts = split_run(key)
    if parts is None or not parts[2]:
        return None
    root, run_id, rest = parts
    run_key = f"{root}/runs/{run_id}" if root else f"runs/{run_id}"
    found = storage.read_versioned(f"{run_key}/manifest.json")  # one request, None when absent
    if found is None:
        return None
    try:
        manifest = json.loads(found[0])
    except ValueError:
        return None
    if not isinstance(manifest, dict) or manifest.get("status") != "complete":
        return None  # a run still writing: its final files may be in flux
    outputs = manifest.get("outputs")
    if not isinstance(outputs, dict):
        return None
    mine = f"runs/{run_id}/{rest}"  # outputs are keyed by path under the run's root
    sums = {k[len(mine) + 1 :]: str(v) for k, v in outputs.items() if k.startswith(mine + "/")}
    if mine in outputs:
        sums[""] = str(outputs[mine])
    return sums or None


def remote_url(storage: S3Storage, key: str) -> str:
    return f"{storage.url}/{key}"


def listing(storage: S3Storage, key: str, what: str, include: Collection[str] | None = None) -> Listing:
    """{path in folder ``key``: [ETag, size]}; ModelLoadError naming ``what`` when it is not
    there (or its upload did not complete). One listing (and the marker of a committed folder)."""
    try:
        entries = storage.dir_entries(key, include)
    except NoFolder:
        raise ModelLoadError(f"{what}: no such folder (or its upload did not complete)") from None
    return {e.rel: [e.etag, e.size] for e in entries}


def pipeline_check(components: Collection[str], whole: bool) -> Callable[[str, Listing], None]:
    """A check of a pipeline folder's listing: model_index.json, each of ``components`` but
    the optional ones, and (``whole``: the whole folder is fetched) a denoiser."""

    def check(what: str, files: Listing) -> None:
        if "model_index.json" not in files:
            raise ModelLoadError(f"{what}: not a diffusers pipeline folder (no model_index.json)")
        for part in (c for c in components if c not in SECOND_TEXT):
            if not any(rel.startswith(part + "/") for rel in files):
                raise ModelLoadError(f"{what}: no {part}/ in the pipeline folder")
        if whole and not any(rel.startswith(d + "/") for d in DENOISERS for rel in files):
            raise ModelLoadError(f"{what}: no unet/ or transformer/ in the pipeline folder")

    return check


def _verify(tmp: Path, files: Collection[str], sums: dict[str, str] | None, url: str) -> None:
    """Each fetched file against the SHA-256 its run recorded (where it recorded them)."""
    if sums is None:
        return
    for rel in sorted(files):
        recorded = sums.get(rel)
        if recorded is None or file_sha256(tmp / rel if rel else tmp) != recorded:
            where = f"{url}/{rel}" if rel else url
            raise ArtefactError(f"{where} does not match the SHA-256 its run recorded (damaged or replaced)")


def _place(root: Path, identity: dict, fetch: Callable[[Path], None]) -> Path:
    """The cached copy of ``identity``, fetched by ``fetch(tmp)`` unless already there."""
    dest = root / hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]
    if dest.exists():
        return dest
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        fetch(tmp)
        try:
            os.replace(tmp, dest)
        except OSError:
            if not dest.exists():  # another process may have put the same copy in place
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def fetch_folder(
    storage: S3Storage,
    key: str,
    what: str,
    include: Collection[str] | None = None,
    check: Callable[[str, Listing], None] | None = None,
    cache_dir: Path | None = None,
) -> Path:
    """The local copy of folder ``key`` (only ``include``'s top-level entries, default all),
    fetched once per content; ``check(what, listing)`` refuses what is not the expected kind
    of folder before anything is fetched."""
    files = listing(storage, key, what, include)
    if check is not None:
        check(what, files)
    url = remote_url(storage, key)

    def fetch(tmp: Path) -> None:
        sums = recorded_sums(storage, key)
        storage.get_dir(key, tmp, include)
        if listing(storage, key, what, include) != files:
            raise ModelLoadError(f"{what} changed while it was being downloaded; try again")
        _verify(tmp, files, sums, url)

    return _place(cache_dir or default_cache_dir(), {"uri": url, "files": files}, fetch)


def fetch_file(storage: S3Storage, key: str, what: str, cache_dir: Path | None = None) -> Path:
    """The local copy of the object ``key`` (under its own name), fetched once per content."""
    found = storage.stat(key)
    if found is None:
        raise ArtefactError(f"{what}: no such file")
    etag, size = found
    url = remote_url(storage, key)
    name = key.rsplit("/", 1)[-1]

    def fetch(tmp: Path) -> None:
        sums = recorded_sums(storage, key)
        storage.get_files({key: tmp / name})
        if (tmp / name).stat().st_size != size or storage.stat(key) != found:
            raise ArtefactError(f"{what} changed while it was being downloaded; try again")
        _verify(tmp / name, [""], sums, url)

    return _place(cache_dir or default_cache_dir(), {"uri": url, "etag": etag, "size": size}, fetch) / name


def remote_fingerprint(storage: S3Storage, key: str, what: str) -> ModelFingerprint:
    """The fingerprint of the pipeline folder ``key``, without downloading it: from the
    SHA-256 of its files where its run recorded them (then it is the fingerprint of any copy
    of the folder, local or remote), else from its listing (ETag and size of every file that
    counts: S3 gives every rewritten object a new ETag)."""
    files = listing(storage, key, what)
    pipeline_check(REQUIRED, whole=True)(what, files)
    counted = [rel for rel in files if is_fingerprinted(rel)]
    sums = recorded_sums(storage, key)
    if sums is not None and set(files) <= set(sums):
        return combine({rel: sums[rel] for rel in counted})
    return combine({rel: f"s3:{files[rel][0]}:{files[rel][1]}" for rel in counted})
