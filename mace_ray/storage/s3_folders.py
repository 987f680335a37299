"""Folders on S3 (``S3Storage.put_dir``, ``get_dir``, ``dir_entries``), parallel transfers
through s3transfer (multipart, several files at once), downloads checked against the commit
marker's sizes.

S3 cannot rename, so ``put_dir`` 1. writes ``<key>/.mace-partial``; 2. deletes
``<key>/.mace-complete``, then every other object under ``<key>/``; 3. uploads every file;
4. writes ``<key>/.mace-complete`` (JSON: every file and its size), the commit point; 5. deletes
``<key>/.mace-partial``. ``exists`` and ``get_dir`` treat a folder with ``.mace-partial`` and no
``.mace-complete`` as absent; ``get_dir`` of a committed folder fetches exactly the files its
marker lists, checking their sizes. A crashed multipart upload can leave invisible parts: give the
bucket an AbortIncompleteMultipartUpload lifecycle rule.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Collection
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from boto3.s3.transfer import create_transfer_manager

from mace_ray.storage.base import StorageError, check_key
from mace_ray.storage.s3_retry import classify

if TYPE_CHECKING:
    from mace_ray.storage.s3 import S3Storage

COMPLETE = ".mace-complete"
PARTIAL = ".mace-partial"
RESERVED = frozenset({COMPLETE, PARTIAL})


class NoFolder(StorageError):
    """A folder with no files, or whose upload did not complete (``dir_entries``)."""


@dataclass(frozen=True)
class DirEntry:
    rel: str  # key relative to the folder
    key: str  # full S3 key
    size: int
    etag: str


def hidden(rel: str) -> bool:
    """Folder placeholders (S3 consoles), markers and dot-files: never listed or fetched."""
    return rel.endswith("/") or any(part.startswith(".") for part in rel.split("/"))


def put_dir(self: S3Storage, local_dir: Path, key: str) -> None:
    """Upload a folder under ``key``, replacing what was there; visible once committed."""
    check_key(key)
    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise StorageError(f"put_dir: {str(local_dir)!r} is not a folder")
    files = {p.relative_to(local_dir).as_posix(): p for p in sorted(local_dir.rglob("*")) if p.is_file()}
    for rel in sorted(RESERVED & set(files)):
        raise StorageError(f"put_dir: {str(local_dir / rel)!r} has a reserved marker name")
    full = self.loc.key(key)
    what = self.uri(key)
    # 1-2: mark as being written, uncommit, clear older or partial contents.
    self.put_object(f"{full}/{PARTIAL}", b"")
    self.delete_keys([f"{full}/{COMPLETE}"], what)
    old = [o["Key"] for o in self.iter_objects(full + "/") if o["Key"] != f"{full}/{PARTIAL}"]
    self.delete_keys(old, what)
    # 3: every file.
    transfer(
        self,
        what,
        [(path, f"{full}/{rel}") for rel, path in files.items()],
        lambda tm, item: tm.upload(str(item[0]), self.bucket, item[1]),
        lambda item: item[1],
    )
    # 4: commit (one PUT, atomic), 5: drop the in-progress marker.
    marker = {
        "files": {rel: path.stat().st_size for rel, path in files.items()},
        "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    self.put_object(f"{full}/{COMPLETE}", json.dumps(marker, indent=1, sort_keys=True).encode())
    self.delete_keys([f"{full}/{PARTIAL}"], what)


def get_dir(self: S3Storage, key: str, local_dir: Path, include: Collection[str] | None = None) -> None:
    """Download folder ``key`` into ``local_dir`` (merged into what is there, as
    ``shutil.copytree(..., dirs_exist_ok=True)`` does); downloads stream to disk.
    ``include``: only these top-level files and subfolders (default: everything)."""
    entries = dir_entries(self, key, include)
    local_dir = Path(local_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    get_files(self, {e.key: local_dir / e.rel for e in entries}, self.uri(key))
    for e in entries:
        if (got := (local_dir / e.rel).stat().st_size) != e.size:
            raise StorageError(f"{self.uri(key)}/{e.rel}: downloaded {got} bytes, expected {e.size}")


def get_files(self: S3Storage, files: dict[str, Path], what: str) -> None:
    """Download objects (``{full key: local path}``) in parallel, streamed to disk (s3transfer:
    ranged parts, its own retries of a cut-off body); errors name ``what`` and the key."""
    for dest in files.values():
        dest.parent.mkdir(parents=True, exist_ok=True)
    transfer(self, what, list(files), lambda tm, k: tm.download(self.bucket, k, str(files[k])), lambda k: k)


def dir_entries(self: S3Storage, key: str, include: Collection[str] | None = None) -> list[DirEntry]:
    """The files ``get_dir(key, include=...)`` fetches, with sizes and ETags. Relative
    paths are checked so that no download can leave the target folder."""
    full = self.loc.key(check_key(key))
    what = self.uri(key)
    objects: dict[str, dict[str, Any]] = {}
    for o in self.iter_objects(full + "/"):
        rel = o["Key"][len(full) + 1 :]
        if rel and not rel.endswith("/"):
            try:
                check_key(rel)
            except StorageError:
                raise StorageError(f"{what}: object name {rel!r} cannot be a local file name") from None
            objects[rel] = o
    out = committed_entries(self, key, objects)
    if include is not None:
        out = [e for e in out if e.rel.split("/")[0] in include]
    return out


def committed_entries(self: S3Storage, key: str, objects: dict[str, dict[str, Any]]) -> list[DirEntry]:
    """A committed folder: exactly the files its marker lists, each present with the
    recorded size. An uncommitted one: an error. A plain folder of objects (not written
    by put_dir): its objects, dot-files excluded."""
    what = self.uri(key)
    if COMPLETE in objects:
        try:
            listed = json.loads(self.read_bytes(f"{key}/{COMPLETE}"))["files"]
            listed = {str(rel): int(size) for rel, size in listed.items()}
        except (ValueError, KeyError, TypeError, AttributeError):
            raise StorageError(f"{what}/{COMPLETE} is not a valid folder marker") from None
        out = []
        for rel, size in sorted(listed.items()):
            o = objects.get(rel)
            if o is None or int(o["Size"]) != size:
                raise StorageError(f"{what}: {rel} is missing or has the wrong size")
            out.append(DirEntry(rel, o["Key"], size, str(o.get("ETag", ""))))
        return out
    if PARTIAL in objects:
        raise NoFolder(f"{what} is incomplete (its upload was interrupted); write it again")
    out = [
        DirEntry(rel, o["Key"], int(o["Size"]), str(o.get("ETag", "")))
        for rel, o in sorted(objects.items())
        if not hidden(rel)
    ]
    if not out:
        raise NoFolder(f"{what} does not exist")
    return out


def transfer(
    self: S3Storage,
    what: str,
    items: list[Any],
    submit: Callable[[Any, Any], Future],
    name: Callable[[Any], str],
) -> None:
    """Run transfers in parallel (s3transfer: multipart, its own retries of a cut-off
    download, every request retried by the client within the budget). When any fails, the
    first failure is raised once every transfer has ended, classified as ``S3Storage.request``
    does; a failure that is not S3's (a guard's refusal) is raised first, as it is."""
    started = time.monotonic()
    failed: list[tuple[Any, BaseException]] = []
    with create_transfer_manager(self.client, self.transfer_config) as tm:
        futures = [(item, submit(tm, item)) for item in items]
        for item, fut in futures:
            try:
                fut.result()
            except Exception as e:  # classified below, once every transfer has ended
                failed.append((item, e))
    if not failed:
        return
    elapsed = time.monotonic() - started

    def mapped(item: Any, err: BaseException) -> Exception | None:
        where = f"{what} ({self.loc.rel(name(item))})"
        return classify(err, where, self.bucket, self.endpoint, elapsed, self.budget_s)

    # A failure that is not S3's (the lease guard's refusal) wins over an S3 one: "rerun to
    # resume" must not hide that another driver took the run over.
    for item, err in failed:
        if mapped(item, err) is None:
            raise err
    raise mapped(*failed[0]) from None
