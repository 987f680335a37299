"""``S3Storage``: the Storage protocol on ``s3://bucket/prefix`` (AWS, MinIO, SeaweedFS...), with
the keys of ``LocalStorage``.

Connection (``mace_ray.storage.s3_client``): credentials, region and endpoint from the standard
AWS configuration (the ``s3_endpoint`` argument, ``--s3-endpoint``, wins); path-style addressing
for any endpoint that is not AWS (MACE_S3_ADDRESSING_STYLE overrides). Retries
(``mace_ray.storage.s3_retry``): no request waits more than MACE_S3_RETRY_SECONDS (default 120 s)
on an S3 that does not answer, opening included (workers open it mid-run); auth failures and
missing buckets are a ``StorageError`` at once, an exhausted budget ``StorageUnavailableError``. A
response body cut off mid-way is resumed where it stopped (a ranged GET of the same ETag), up to
5 times as s3transfer does. ``bounded(seconds)``: the same location with a shorter budget (the run
lock's renewals); ``guarded(check)``: every write request first calls ``check()`` (the run lock).

Atomicity. A single PUT is atomic, so DONE markers, manifests and reports appear whole or not at
all; ``put_dir`` cannot rename, so it commits a folder with markers (``mace_ray.storage.s3_folders``):
a crash leaves the old committed folder or nothing that looks complete. ``list()`` hides names
starting with '.' and the files of uncommitted folders.

Conditional writes (the run lock's lease, ``mace_ray.storage.lease``): PutObject with If-None-Match
``*`` or If-Match ``<etag>`` (AWS since 2024); the server decides, so of two racing requests exactly
one succeeds and the other gets 412. Verified on SeaweedFS 4.48 (12 racing clients, one winner in
each of 80 rounds) and required of the server. A request retried after a lost response can fail
its precondition because its first attempt succeeded: False then means "not done by this
attempt"; callers that must know re-read the object (RunLock compares the owner).
"""

from __future__ import annotations

import copy
import hashlib
import io
import logging
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

from boto3.s3.transfer import TransferConfig
from botocore.exceptions import ClientError

from mace_ray.storage import s3_folders
from mace_ray.storage.base import StorageError, check_key
from mace_ray.storage.s3_client import (
    addressing_style,
    make_client,
    parse_s3_url,
    retry_budget,
    safe_endpoint,
)
from mace_ray.storage.s3_folders import COMPLETE, PARTIAL, RESERVED, hidden
from mace_ray.storage.s3_retry import (
    NETWORK_ERRORS,
    BoundedRetries,
    classify,
    detail,
    error_code,
    http_status,
)

log = logging.getLogger("mace_ray.s3")

MB = 1024 * 1024
# Reads stream in chunks of 1 MiB (driver memory stays flat in the size of a file); a body cut
# off is resumed at most this many times (s3transfer's num_download_attempts).
READ_CHUNK = MB
BODY_ATTEMPTS = 5
# Requests that change the bucket: a guarded storage checks before each (multipart parts too).
WRITE_OPERATIONS = (
    "PutObject", "CopyObject", "DeleteObject", "DeleteObjects", "CreateMultipartUpload", "UploadPart",
    "UploadPartCopy", "CompleteMultipartUpload",
)  # fmt: skip
# Parts of 16 MiB: a 3.4 GB SD UNet is ~210 parts (S3 allows 10,000, so files up to
# 160 GB), a 235 MB text encoder still spreads over all 8 connections, and a failed part
# re-sends at most 16 MiB. On loopback the part size (8-64 MiB) and concurrency (4-16) made
# no difference (benchmarks/README.md): the server is the bottleneck there, not the client.
MULTIPART_THRESHOLD = 16 * MB
MULTIPART_CHUNK = 16 * MB
CONCURRENCY = 8


def _basename(key: str) -> str:
    return key.rsplit("/", 1)[-1]


class S3Storage:
    """A run root in ``s3://bucket/prefix``. See the module docstring for the guarantees."""

    page_size = 1000  # keys per listing request: S3's maximum; tests lower it to exercise paging

    def __init__(
        self,
        url: str,
        s3_endpoint: str | None = None,
        *,
        retry_seconds: float | None = None,
        multipart_threshold: int = MULTIPART_THRESHOLD,
        multipart_chunksize: int = MULTIPART_CHUNK,
        concurrency: int = CONCURRENCY,
    ) -> None:
        self.loc = parse_s3_url(url)
        self.url, self.bucket, self.s3_endpoint = self.loc.url, self.loc.bucket, s3_endpoint
        # What a worker that unpickles it passes again (retry_seconds None: its own environment's).
        self._args = {
            "retry_seconds": retry_seconds,
            "multipart_threshold": multipart_threshold,
            "multipart_chunksize": multipart_chunksize,
            "concurrency": concurrency,
        }
        self.budget_s = retry_budget() if retry_seconds is None else retry_seconds
        self.guard: Callable[[], None] | None = None
        self._bounded: dict[float, S3Storage] = {}
        self.client = self._make_client()
        self.endpoint = safe_endpoint(s3_endpoint or self.client.meta.endpoint_url)
        self.transfer_config = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_chunksize,
            max_concurrency=concurrency,
            use_threads=True,
        )
        self._check_bucket()

    def _make_client(self) -> Any:
        pool, retries = self._args["concurrency"] + 4, BoundedRetries(self.budget_s)
        client = make_client(self.url, self.s3_endpoint, addressing_style(), pool=pool, retries=retries)
        for op in WRITE_OPERATIONS if self.guard is not None else ():
            client.meta.events.register(
                f"before-parameter-build.s3.{op}", lambda guard=self.guard, **_: guard()
            )
        return client

    def _variant(self, budget_s: float, guard: Callable[[], None] | None) -> S3Storage:
        other = copy.copy(self)
        other._bounded, other._args, other.budget_s = {}, {**self._args, "retry_seconds": budget_s}, budget_s
        other.guard = guard
        other.client = other._make_client()
        return other

    def bounded(self, budget_s: float) -> S3Storage:
        """The same location through a client whose every request ends within ``budget_s``
        (retries included); its guard, if any, is kept. Made once per budget (a client takes
        a few tenths of a second to build)."""
        if budget_s not in self._bounded:
            self._bounded[budget_s] = self._variant(budget_s, self.guard)
        return self._bounded[budget_s]

    def guarded(self, check: Callable[[], None]) -> S3Storage:
        """The same location; every request that writes or deletes first calls ``check()``,
        which raises to refuse it (nothing is sent). Reads are not checked."""
        return self._variant(self.budget_s, check)

    # Ray ships storage objects to workers: send the location, never the client or a
    # credential; each process builds its own client from its own environment.
    def __reduce__(self) -> tuple[Callable[..., S3Storage], tuple[Any, ...]]:
        # A guard goes along (a lease check is picklable); one that is not fails loudly here.
        return (_reopen, (self.url, self.s3_endpoint, self._args, self.guard))

    def __repr__(self) -> str:
        return f"S3Storage({self.url!r}, endpoint={self.endpoint!r})"

    # --- requests -------------------------------------------------------------------

    def uri(self, key: str) -> str:
        return f"{self.url}/{key}"

    def request(self, what: str, fn: Callable[[], Any]) -> Any:
        """``fn()`` (S3 requests, retried by the client within the budget); what fails is
        classified (``s3_retry.classify``): StorageError, StorageUnavailableError, or the error
        itself when it is not S3's."""
        started = time.monotonic()
        try:
            return fn()
        except Exception as e:
            mapped = classify(e, what, self.bucket, self.endpoint, time.monotonic() - started, self.budget_s)
            if mapped is None:
                raise
            raise mapped from None

    def _check_bucket(self) -> None:
        """head_bucket now, so a missing bucket or bad credentials fail before any work."""

        def head() -> bool:
            try:
                self.client.head_bucket(Bucket=self.bucket)
                return True
            except ClientError as e:
                if http_status(e) == 404:
                    return False
                if http_status(e) == 403:
                    # A HEAD error has no body, so 403 does not say why; a one-key listing
                    # raises the precise code (InvalidAccessKeyId, SignatureDoesNotMatch...).
                    self.client.list_objects_v2(Bucket=self.bucket, Prefix=self.loc.prefix, MaxKeys=1)
                raise

        if not self.request(self.url, head):
            raise StorageError(f"{self.url}: bucket {self.bucket!r} does not exist at {self.endpoint}")

    def head(self, full: str) -> tuple[str, int] | None:
        """(ETag, size) of the object ``full``, None if there is none."""

        def ask() -> tuple[str, int] | None:
            try:
                found = self.client.head_object(Bucket=self.bucket, Key=full)
                return str(found["ETag"]), int(found["ContentLength"])
            except ClientError as e:
                if http_status(e) == 404 and error_code(e) != "NoSuchBucket":
                    return None
                raise

        return self.request(self.uri(self.loc.rel(full)), ask)

    def _first_page(self, full_prefix: str) -> dict[str, Any]:
        return self.request(
            self.uri(self.loc.rel(full_prefix)),
            lambda: self.client.list_objects_v2(
                Bucket=self.bucket, Prefix=full_prefix, MaxKeys=self.page_size
            ),
        )

    def iter_objects(self, full_prefix: str) -> Iterator[dict[str, Any]]:
        """Every object under ``full_prefix``, page by page (boto3's paginator)."""
        what = self.uri(self.loc.rel(full_prefix))
        paginator = self.client.get_paginator("list_objects_v2")
        config = {"PageSize": self.page_size}
        pages = iter(paginator.paginate(Bucket=self.bucket, Prefix=full_prefix, PaginationConfig=config))
        while (page := self.request(what, lambda: next(pages, None))) is not None:
            if page.get("IsTruncated") and not page.get("NextContinuationToken"):
                raise StorageError(f"{what}: listing truncated without a token")
            yield from page.get("Contents", [])

    def put_object(self, full: str, data: bytes) -> None:
        self.request(
            self.uri(self.loc.rel(full)),
            lambda: self.client.put_object(Bucket=self.bucket, Key=full, Body=data),
        )

    def delete_keys(self, keys: list[str], what: str) -> None:
        for i in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = {"Objects": [{"Key": k} for k in keys[i : i + 1000]], "Quiet": True}
            resp = self.request(
                what, lambda b=batch: self.client.delete_objects(Bucket=self.bucket, Delete=b)
            )
            errors = resp.get("Errors") or []
            if errors:
                first = errors[0]
                raise StorageError(
                    f"{what}: could not delete {len(errors)} objects "
                    f"(first: {self.loc.rel(first.get('Key', ''))}: {first.get('Code', '?')})"
                )

    # --- the Storage protocol --------------------------------------------------------

    def writable_key(self, key: str) -> str:
        """The full S3 key of a file ``key`` (checked: not outside the root, not a marker name)."""
        check_key(key)
        if _basename(key) in RESERVED:
            raise StorageError(f"{self.uri(key)}: the name {_basename(key)!r} is reserved for folder markers")
        return self.loc.key(key)

    def write_bytes(self, key: str, data: bytes) -> None:
        self.put_object(self.writable_key(key), data)

    def _stream(self, key: str, full: str, sink: Callable[[bytes], object]) -> str | None:
        """Feed the object's bytes to ``sink`` in chunks; its ETag, or None if there is no such
        object. A body cut off mid-way is resumed where it stopped, with a ranged GET that must
        match the first response's ETag: every chunk comes from one version of the object."""
        what = self.uri(key)
        offset, etag = 0, None
        for attempt in range(1, BODY_ATTEMPTS + 1):
            resumed = {} if etag is None else {"Range": f"bytes={offset}-", "IfMatch": etag}

            def get(resumed: dict[str, str] = resumed) -> Any:
                try:
                    return self.client.get_object(Bucket=self.bucket, Key=full, **resumed)
                except ClientError as e:
                    code = error_code(e)
                    if resumed and code in ("PreconditionFailed", "NoSuchKey", "404"):
                        raise StorageError(f"{what} was replaced or deleted while it was read") from None
                    if code in ("NoSuchKey", "404"):
                        return None
                    raise

            started = time.monotonic()
            resp = self.request(what, get)
            if resp is None:
                return None
            etag = etag or str(resp["ETag"])
            try:
                for chunk in resp["Body"].iter_chunks(READ_CHUNK):
                    sink(chunk)
                    offset += len(chunk)
                return etag
            except NETWORK_ERRORS as e:
                if attempt == BODY_ATTEMPTS:
                    seconds = time.monotonic() - started
                    raise classify(e, what, self.bucket, self.endpoint, seconds, self.budget_s) from None
                log.warning("%s: S3 response cut off at byte %d (%s); resuming", what, offset, detail(e))
            finally:
                resp["Body"].close()
        raise AssertionError("unreachable")

    def _get(self, key: str, full: str) -> tuple[bytes, str] | None:
        """(body, ETag) of the object, or None if there is no such object."""
        buf = io.BytesIO()  # getvalue() hands over its buffer: one copy of the data in memory
        etag = self._stream(key, full, buf.write)
        return None if etag is None else (buf.getvalue(), etag)

    def read_bytes(self, key: str) -> bytes:
        got = self._get(key, self.loc.key(check_key(key)))
        if got is None:
            raise StorageError(f"{self.uri(key)} does not exist")
        return got[0]

    def digest(self, key: str) -> str:
        """SHA-256 (hex) of a stored object, streamed: memory stays flat whatever its size.
        The bytes themselves are hashed: an ETag is an MD5 only for single-part uploads
        without SSE-KMS/SSE-C (a multipart ETag hashes the parts' MD5s, so it depends on the
        part size), and an MD5 is not what the run's checksums record."""
        h = hashlib.sha256()
        if self._stream(key, self.loc.key(check_key(key)), h.update) is None:
            raise StorageError(f"{self.uri(key)} does not exist")
        return h.hexdigest()

    def exists(self, key: str) -> bool:
        """An object, a folder committed by put_dir, or a plain folder of objects; a folder
        whose put_dir has not committed does not exist."""
        full = self.loc.key(check_key(key))
        if self.head(full) is not None:
            return True
        page = self._first_page(full + "/")
        names = {self.loc.rel(o["Key"])[len(key) + 1 :] for o in page.get("Contents", [])}
        if not names:
            return False
        if page.get("IsTruncated") and not names & RESERVED:
            # Markers sort early but not first ('-' < '.'): ask for them directly.
            return self.head(f"{full}/{COMPLETE}") is not None or self.head(f"{full}/{PARTIAL}") is None
        return COMPLETE in names or PARTIAL not in names

    def list(self, prefix: str) -> list[str]:
        """All object keys under ``prefix`` (recursive), sorted; markers, dot-files and the
        files of uncommitted put_dir folders excluded."""
        full = self.loc.key(check_key(prefix)) + "/"
        rels = [self.loc.rel(o["Key"]) for o in self.iter_objects(full)]
        present = set(rels)
        folders = [r[: -len(PARTIAL)] for r in rels if _basename(r) == PARTIAL]
        uncommitted = [f for f in folders if f + COMPLETE not in present]
        return sorted(r for r in rels if not hidden(r) and not any(r.startswith(u) for u in uncommitted))

    def put_dir(self, local_dir: Path, key: str) -> None:
        """Upload a folder under ``key``, replacing what was there; visible once committed."""
        s3_folders.put_dir(self, local_dir, key)

    def get_dir(self, key: str, local_dir: Path, include: Collection[str] | None = None) -> None:
        """Download folder ``key`` into ``local_dir`` (merged into what is there); ``include``:
        only these top-level files and subfolders (default: everything)."""
        s3_folders.get_dir(self, key, local_dir, include)

    def get_files(self, files: Mapping[str, Path]) -> None:
        """Download objects (``{key: local path}``) in parallel, streamed to disk."""
        s3_folders.get_files(self, {self.loc.key(check_key(k)): Path(p) for k, p in files.items()}, self.url)

    def stat(self, key: str) -> tuple[str, int] | None:
        """(ETag, size) of the object ``key``, None if there is none (one HEAD request)."""
        return self.head(self.loc.key(check_key(key)))

    def dir_entries(self, key: str, include: Collection[str] | None = None) -> list[s3_folders.DirEntry]:
        """The files ``get_dir(key, include=...)`` fetches, with sizes and ETags."""
        return s3_folders.dir_entries(self, key, include)

    def delete_prefix(self, prefix: str) -> None:
        full = self.loc.key(check_key(prefix))
        what = self.uri(prefix)
        # The commit marker goes first, so a crash midway leaves nothing that looks complete.
        self.delete_keys([f"{full}/{COMPLETE}"], what)
        self.delete_keys([*(o["Key"] for o in self.iter_objects(full + "/")), full], what)

    # --- conditional operations (the module docstring) --------------------------------

    def _conditional(self, key: str, request: Callable[[], Any]) -> bool:
        """``request()`` under a precondition: True when applied, False when the precondition
        failed (412, or 404 for an object that is gone). 409 ConditionalRequestConflict (a
        concurrent operation on the key won the race) is retried by the client, as AWS advises."""

        def attempt() -> bool:
            try:
                request()
                return True
            except ClientError as e:
                code, status = error_code(e), http_status(e)
                if status == 412 or code == "PreconditionFailed":
                    return False
                if code in ("NoSuchKey", "404") or (status == 404 and code != "NoSuchBucket"):
                    return False
                raise

        return self.request(self.uri(key), attempt)

    def create_exclusive(self, key: str, data: bytes) -> bool:
        """Write ``key`` only if no object has that name (If-None-Match: *); False if one does."""
        full = self.writable_key(key)
        return self._conditional(
            key, lambda: self.client.put_object(Bucket=self.bucket, Key=full, Body=data, IfNoneMatch="*")
        )

    def read_versioned(self, key: str) -> tuple[bytes, str] | None:
        """``(data, ETag)`` of ``key``, or None if absent."""
        return self._get(key, self.writable_key(key))

    def replace_if(self, key: str, data: bytes, version: str) -> bool:
        """Replace ``key`` only if its ETag is still ``version`` (If-Match)."""
        full = self.writable_key(key)
        return self._conditional(
            key, lambda: self.client.put_object(Bucket=self.bucket, Key=full, Body=data, IfMatch=version)
        )

    def delete_if(self, key: str, version: str) -> bool:
        """Delete ``key`` only if its ETag is still ``version``. DeleteObject with If-Match is
        honoured by SeaweedFS 4.48 and AWS, but older S3-compatible servers delete
        unconditionally; so the ETag is compared first (HEAD) as well: on such a server, a
        replace between the HEAD and the DELETE is the only way another writer's object goes."""
        full = self.writable_key(key)
        found = self.head(full)
        if found is None or found[0] != version:
            return False
        return self._conditional(
            key, lambda: self.client.delete_object(Bucket=self.bucket, Key=full, IfMatch=version)
        )


def _reopen(
    url: str, endpoint: str | None, args: dict[str, Any], guard: Callable[[], None] | None
) -> S3Storage:
    storage = S3Storage(url, endpoint, **args)
    return storage if guard is None else storage.guarded(guard)
