"""Storage for the run layout: keys are relative POSIX paths under one root.

The protocol every store implements, its errors and the JSON helpers. The stores:
``mace_ray.storage.local.LocalStorage`` (a local folder) and ``mace_ray.storage.s3.S3Storage``
(``s3://bucket/prefix``) with the same keys; ``mace_ray.storage.open_store.open_storage`` picks one for
a URL. Writes are atomic: a reader sees a whole object or none, so a DONE marker written
last vouches for everything written before it. ``digest`` hashes a stored file in chunks, so
verifying a model never holds it in memory. ``bounded`` and ``guarded`` give the same location
with a shorter retry budget, or with a check before every write (the run lock's lease).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from mace_core.errors import MaceError


class StorageError(MaceError):
    """A storage location is unusable (bad URI, no permission, missing bucket)."""


class StorageUnavailableError(Exception):
    """Storage stayed unreachable through every retry: an infrastructure failure, not bad
    input (so not a MaceError: the CLI exits 1). Completed work is kept; rerun to resume."""


def check_key(key: str) -> str:
    """Reject keys that could leave the root: absolute, empty parts, '.' or '..'."""
    if not key or any(part in ("", ".", "..") for part in key.split("/")):  # "/x": an empty part
        raise StorageError(f"invalid storage key {key!r}")
    return key


class Storage(Protocol):
    url: str

    def write_bytes(self, key: str, data: bytes) -> None: ...
    def read_bytes(self, key: str) -> bytes: ...
    def exists(self, key: str) -> bool: ...
    def list(self, prefix: str) -> list[str]: ...
    def put_dir(self, local_dir: Path, key: str) -> None: ...
    def get_dir(self, key: str, local_dir: Path) -> None: ...
    def get_files(self, files: Mapping[str, Path]) -> None: ...  # {key: local path}, copied out
    def delete_prefix(self, prefix: str) -> None: ...
    def digest(self, key: str) -> str: ...  # SHA-256 hex of a stored file, read in chunks

    # The same location: every request ends within budget_s (retries included); or every
    # write (write_bytes, put_dir, delete_prefix) first calls check(), which raises to refuse.
    def bounded(self, budget_s: float) -> Storage: ...
    def guarded(self, check: Callable[[], None]) -> Storage: ...

    # Conditional operations (compare-and-swap on one object), for leases (mace_ray.storage.lease).
    def create_exclusive(self, key: str, data: bytes) -> bool: ...
    def read_versioned(self, key: str) -> tuple[bytes, str] | None: ...
    def replace_if(self, key: str, data: bytes, version: str) -> bool: ...
    def delete_if(self, key: str, version: str) -> bool: ...


def json_bytes(obj: Any) -> bytes:
    """How every JSON file of a run is written (the bytes a checksum covers)."""
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def write_json(storage: Storage, key: str, obj: Any) -> None:
    storage.write_bytes(key, json_bytes(obj))


def read_json(storage: Storage, key: str) -> Any:
    data = storage.read_bytes(key)
    try:
        return json.loads(data)
    except json.JSONDecodeError as e:
        raise StorageError(f"{storage.url}/{key} is not valid JSON: {e}") from None
