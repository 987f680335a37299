"""One resolver for what a command reads: a local path or an ``s3://`` URL, the same way.

Every command that takes a run, a run root, a pipeline, an erasure file, a model, a detector
or a segmenter resolves it through a ``Sources`` (one per command): a local path is used
where it is; a remote one is read where it is (manifests, listings) and fetched, when a
local copy is needed, into the content-keyed, verified cache of
``mace_ray.storage.model_cache``. A URL is only ever handled as a string (``join``), never
through ``Path``, which would turn ``s3://b/k`` into ``s3:/b/k``.

Clients: an ``s3://`` input under the command's output (``output=``, the storage the
command opened) is read through the output's own client; any other is read through one
client per bucket, shared by every input in that bucket.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from mace_core.errors import ArtefactError, ModelLoadError
from mace_core.fingerprint import ModelFingerprint
from mace_core.source_folder import model_fingerprint
from mace_ray.storage.base import Storage, StorageError
from mace_ray.storage.model_cache import (
    Listing,
    fetch_file,
    fetch_folder,
    is_remote,
    listing,
    pipeline_check,
    remote_fingerprint,
)
from mace_ray.storage.open_store import open_storage
from mace_ray.storage.s3 import S3Storage
from mace_ray.storage.s3_client import parse_s3_url


def join(spec: str, *parts: str) -> str:
    """``spec/part/...``: a URL as a string, a local path as the OS joins it."""
    if is_remote(spec):
        return "/".join([spec.rstrip("/"), *parts])
    return str(Path(spec).expanduser().joinpath(*parts))


def canonical(spec: str) -> str:
    """A URL without its trailing slash; a local path absolute (workers may run elsewhere)."""
    if is_remote(spec):
        return spec.rstrip("/")
    return str(Path(spec).expanduser().resolve())


def _holds(marker: str) -> Callable[[str, Listing], None]:
    """A check of a folder's listing: it holds ``marker`` (a transformers model: config.json)."""

    def check(label: str, files: Listing) -> None:
        if marker not in files:
            raise ModelLoadError(f"{label}: not a model folder (no {marker})")

    return check


class Sources:
    """The inputs of one command, local or remote. ``output``: the storage the command opened
    for its results (its client serves the inputs under it)."""

    def __init__(
        self, s3_endpoint: str | None = None, output: Storage | None = None, cache_dir: Path | None = None
    ) -> None:
        self.s3_endpoint = s3_endpoint
        self.cache_dir = cache_dir
        self.output = output
        # Opened S3 storages, the output's first: an input under one's root is read through it.
        self.opened: list[S3Storage] = [output] if output is not None and is_remote(output.url) else []

    def remote(self, url: str) -> tuple[S3Storage, str]:
        """(an S3Storage whose root holds ``url``, the key of ``url`` under it)."""
        loc = parse_s3_url(url)
        if not loc.prefix:
            raise StorageError(f"{url!r}: name a folder or file inside the bucket (s3://bucket/path)")
        for storage in self.opened:
            root = parse_s3_url(storage.url)
            if root.bucket == loc.bucket and (not root.prefix or loc.prefix.startswith(root.prefix + "/")):
                return storage, root.rel(loc.prefix)
        storage = S3Storage(f"s3://{loc.bucket}", self.s3_endpoint)
        self.opened.append(storage)
        return storage, loc.prefix

    def open_root(self, spec: str) -> Storage:
        """The storage of a root that is only read (a run's ``--output``): the command's
        output when it is the same location, else opened; a local one must exist."""
        if self.output is not None and canonical(self.output.url) == canonical(spec):
            return self.output
        return open_storage(spec, s3_endpoint=self.s3_endpoint, must_exist=True)

    # --- reading in place ------------------------------------------------------------

    def exists(self, spec: str) -> bool:
        """A file or folder (an S3 folder: committed, or a plain folder of objects)."""
        if not is_remote(spec):
            return Path(spec).expanduser().exists()
        storage, key = self.remote(spec)
        return storage.exists(key)

    def read_json(self, spec: str, what: str) -> Any:
        """A JSON file, parsed; ArtefactError naming ``what`` when it is not JSON."""
        try:
            if is_remote(spec):
                storage, key = self.remote(spec)
                data = storage.read_bytes(key)
            else:
                data = Path(spec).expanduser().read_bytes()
            return json.loads(data)
        except (OSError, ValueError) as e:
            raise ArtefactError(f"{what} {spec!r} cannot be read: {e}") from None

    # --- local copies ----------------------------------------------------------------

    def pipeline(self, spec: str, components: Collection[str] | None = None) -> str:
        """What ``load_pipeline`` takes for a model: ``spec`` itself (``tiny``, a hub id, a
        local folder), or a remote folder's cached copy (only ``components`` and
        model_index.json when given)."""
        if not is_remote(spec):
            return spec
        storage, key = self.remote(spec)
        include = None if components is None else {"model_index.json", *components}
        check = pipeline_check(components or (), whole=components is None)
        return str(fetch_folder(storage, key, f"model {spec!r}", include, check, self.cache_dir))

    def folder(self, spec: str, what: str, marker: str = "config.json") -> str:
        """A folder holding ``marker`` (a transformers model: config.json): ``spec`` itself
        unless remote, then its cached copy."""
        if not is_remote(spec):
            return spec
        storage, key = self.remote(spec)
        return str(fetch_folder(storage, key, f"{what} {spec!r}", None, _holds(marker), self.cache_dir))

    def file(self, spec: str, what: str) -> str:
        """A file: ``spec`` itself unless remote, then its cached copy."""
        if not is_remote(spec):
            return spec
        storage, key = self.remote(spec)
        return str(fetch_file(storage, key, f"{what} {spec!r}", self.cache_dir))

    def fingerprint(self, spec: str) -> ModelFingerprint:
        """The model's fingerprint (``mace_core.fingerprint``); a remote folder's without
        downloading it (``model_cache.remote_fingerprint``)."""
        if not is_remote(spec):
            return model_fingerprint(spec)
        storage, key = self.remote(spec)
        return remote_fingerprint(storage, key, f"model {spec!r}")

    def check_folder(self, spec: str, what: str, marker: str = "config.json") -> None:
        """That a remote folder holds ``marker``, without fetching it (its listing)."""
        storage, key = self.remote(spec)
        label = f"{what} {spec!r}"
        _holds(marker)(label, listing(storage, key, label, {marker}))

    def check_file(self, spec: str, what: str) -> None:
        """That a remote file exists, without fetching it."""
        storage, key = self.remote(spec)
        if storage.stat(key) is None:
            raise ArtefactError(f"{what} {spec!r}: no such file")
