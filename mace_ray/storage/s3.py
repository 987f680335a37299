"""``S3Storage``: the Storage protocol on ``s3://bucket/prefix`` (AWS, MinIO, SeaweedFS...).

Keys are relative POSIX paths under the prefix, exactly as for ``LocalStorage``.

Connection. A boto3 client built from the standard AWS configuration: credentials from
AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY(/AWS_SESSION_TOKEN), AWS_PROFILE or an instance
role; region from AWS_REGION/AWS_DEFAULT_REGION/the profile; endpoint from the
``s3_endpoint`` argument (``--s3-endpoint``), else AWS_ENDPOINT_URL_S3/AWS_ENDPOINT_URL or
the profile's endpoint_url, else AWS itself.

Addressing. MACE_S3_ADDRESSING_STYLE=path|virtual|auto wins when set. Otherwise path-style
(``http://host/bucket/key``) for any endpoint that is not AWS, because MinIO, SeaweedFS and
most on-premise servers serve only that, and bucket-named host names do not resolve for
``127.0.0.1`` or a cluster service name; and botocore's default (virtual-hosted) for AWS,
which is deprecating path-style.

Retries (see ``mace_ray.storage.s3_retry``). botocore "standard" retries (3 attempts) plus a time
budget of MACE_S3_RETRY_SECONDS (default 120 s) for throttling, 5xx and network errors,
each retry logged as a warning. The budget is the same when storage is opened: workers open
it mid-run, when an outage is as likely as at any other time (so a mistyped endpoint takes
the budget to fail, its retries logged meanwhile). Auth failures and missing buckets are
never retried: they raise ``StorageError`` naming the bucket and URI (never a key). When the
budget runs out, ``StorageUnavailableError``.

Atomicity. A single PUT is atomic on S3, so DONE markers, manifests and reports (written
with ``write_bytes``) appear whole or not at all. ``put_dir`` cannot rename, so it:
1. writes ``<key>/.mace-partial`` (the folder is now "being written"),
2. deletes ``<key>/.mace-complete`` and then every other object left under ``<key>/``
   (an older copy or a crashed partial upload),
3. uploads every file (large ones as multipart uploads, several files at once),
4. writes ``<key>/.mace-complete`` (JSON: every file and its size) - the commit point,
5. deletes ``<key>/.mace-partial``.
``exists(key)`` and ``get_dir(key)`` treat a folder with ``.mace-partial`` and no
``.mace-complete`` as absent, and ``get_dir`` of a committed folder fetches exactly the
files its marker lists and checks their sizes. A crash anywhere leaves either the old
committed folder or nothing that looks complete. ``list()`` hides names starting with '.'
(as LocalStorage hides its temporaries) and the files of uncommitted folders.
A crashed multipart upload can leave invisible parts behind: give the bucket an
AbortIncompleteMultipartUpload lifecycle rule.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterator
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
from mace_ray.storage.s3_retry import Retrier, RetryPolicy, error_code, http_status

MB = 1024 * 1024
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
        self.url = self.loc.url
        self.bucket = self.loc.bucket
        self._init_args = (s3_endpoint, retry_seconds, multipart_threshold, multipart_chunksize, concurrency)
        self.client = make_client(self.url, s3_endpoint, addressing_style(), pool=concurrency + 4)
        self.endpoint = safe_endpoint(s3_endpoint or self.client.meta.endpoint_url)
        budget = retry_budget() if retry_seconds is None else retry_seconds
        self.retrier = Retrier(RetryPolicy(budget_s=budget), self.bucket, self.endpoint)
        self.transfer_config = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_chunksize,
            max_concurrency=concurrency,
            use_threads=True,
        )
        self._check_bucket()

    # Ray ships storage objects to workers: send the location, never the client or a
    # credential; each process builds its own client from its own environment.
    def __reduce__(self) -> tuple[Callable[..., S3Storage], tuple[Any, ...]]:
        return (_reopen, (self.url, *self._init_args))

    def __repr__(self) -> str:
        return f"S3Storage({self.url!r}, endpoint={self.endpoint!r})"

    # --- requests -------------------------------------------------------------------

    def uri(self, key: str) -> str:
        return f"{self.url}/{key}"

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        """One S3 request with retries; ClientErrors left unclassified become StorageErrors."""
        try:
            return self.retrier.call(what, fn)
        except ClientError as e:
            raise StorageError(f"{what}: S3 request failed ({error_code(e) or http_status(e)})") from None

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

        if not self._call(self.url, head):
            raise StorageError(f"{self.url}: bucket {self.bucket!r} does not exist at {self.endpoint}")

    def _head(self, full: str) -> bool:
        def head() -> bool:
            try:
                self.client.head_object(Bucket=self.bucket, Key=full)
                return True
            except ClientError as e:
                if http_status(e) == 404 and error_code(e) != "NoSuchBucket":
                    return False
                raise

        return self._call(self.uri(self.loc.rel(full)), head)

    def _list_page(self, full_prefix: str, token: str | None) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": full_prefix, "MaxKeys": self.page_size}
        if token:
            kwargs["ContinuationToken"] = token
        return self._call(self.uri(self.loc.rel(full_prefix)), lambda: self.client.list_objects_v2(**kwargs))

    def iter_objects(self, full_prefix: str) -> Iterator[dict[str, Any]]:
        """Every object under ``full_prefix`` (which ends with '/'), page by page."""
        token: str | None = None
        while True:
            page = self._list_page(full_prefix, token)
            yield from page.get("Contents", [])
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated"):
                return
            if not token:
                raise StorageError(
                    f"{self.uri(self.loc.rel(full_prefix))}: listing truncated without a token"
                )

    def put_object(self, full: str, data: bytes) -> None:
        self._call(
            self.uri(self.loc.rel(full)),
            lambda: self.client.put_object(Bucket=self.bucket, Key=full, Body=data),
        )

    def delete_keys(self, keys: list[str], what: str) -> None:
        for i in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = {"Objects": [{"Key": k} for k in keys[i : i + 1000]], "Quiet": True}
            resp = self._call(what, lambda b=batch: self.client.delete_objects(Bucket=self.bucket, Delete=b))
            errors = resp.get("Errors") or []
            if errors:
                first = errors[0]
                raise StorageError(
                    f"{what}: could not delete {len(errors)} objects "
                    f"(first: {self.loc.rel(first.get('Key', ''))}: {first.get('Code', '?')})"
                )

    # --- the Storage protocol --------------------------------------------------------

    def write_bytes(self, key: str, data: bytes) -> None:
        check_key(key)
        if _basename(key) in RESERVED:
            raise StorageError(f"{self.uri(key)}: the name {_basename(key)!r} is reserved for folder markers")
        self.put_object(self.loc.key(key), data)

    def _get(self, key: str, full: str) -> tuple[bytes, str] | None:
        """(body, ETag) of one GET, or None if there is no such object. Body and ETag come
        from the same response, so they describe the same object version."""

        def get() -> tuple[bytes, str] | None:
            try:
                resp = self.client.get_object(Bucket=self.bucket, Key=full)
            except ClientError as e:
                if error_code(e) in ("NoSuchKey", "404"):
                    return None
                raise
            with resp["Body"] as body:  # read inside the retry: a reset mid-body retries the GET
                return body.read(), str(resp["ETag"])

        return self._call(self.uri(key), get)

    def read_bytes(self, key: str) -> bytes:
        got = self._get(key, self.loc.key(check_key(key)))
        if got is None:
            raise StorageError(f"{self.uri(key)} does not exist")
        return got[0]

    def exists(self, key: str) -> bool:
        """An object, a folder committed by put_dir, or a plain folder of objects; a folder
        whose put_dir has not committed does not exist."""
        full = self.loc.key(check_key(key))
        if self._head(full):
            return True
        page = self._list_page(full + "/", None)
        names = {self.loc.rel(o["Key"])[len(key) + 1 :] for o in page.get("Contents", [])}
        if not names:
            return False
        if page.get("IsTruncated") and not names & RESERVED:
            # Markers sort early but not first ('-' < '.'): ask for them directly.
            if self._head(f"{full}/{COMPLETE}"):
                return True
            return not self._head(f"{full}/{PARTIAL}")
        return COMPLETE in names or PARTIAL not in names

    def list(self, prefix: str) -> list[str]:
        """All object keys under ``prefix`` (recursive), sorted; markers, dot-files and the
        files of uncommitted put_dir folders excluded."""
        full = self.loc.key(check_key(prefix)) + "/"
        rels = [self.loc.rel(o["Key"]) for o in self.iter_objects(full)]
        present = set(rels)
        uncommitted = [
            r[: -len(PARTIAL)]
            for r in rels
            if _basename(r) == PARTIAL and r[: -len(PARTIAL)] + COMPLETE not in present
        ]
        return sorted(r for r in rels if not hidden(r) and not any(r.startswith(u) for u in uncommitted))

    def put_dir(self, local_dir: Path, key: str) -> None:
        """Upload a folder under ``key``, replacing what was there; visible once committed
        (the protocol is in the module docstring and ``mace_ray.storage.s3_folders``)."""
        s3_folders.put_dir(self, local_dir, key)

    def get_dir(self, key: str, local_dir: Path, include: Collection[str] | None = None) -> None:
        """Download folder ``key`` into ``local_dir`` (merged into what is there); ``include``:
        only these top-level files and subfolders (default: everything)."""
        s3_folders.get_dir(self, key, local_dir, include)

    def dir_entries(self, key: str, include: Collection[str] | None = None) -> list[s3_folders.DirEntry]:
        """The files ``get_dir(key, include=...)`` fetches, with sizes and ETags."""
        return s3_folders.dir_entries(self, key, include)

    def delete_prefix(self, prefix: str) -> None:
        full = self.loc.key(check_key(prefix))
        what = self.uri(prefix)
        # The commit marker goes first, so a crash midway leaves nothing that looks complete.
        self.delete_keys([f"{full}/{COMPLETE}"], what)
        keys = [o["Key"] for o in self.iter_objects(full + "/")]
        self.delete_keys([*keys, full], what)

    # --- conditional operations (leases, see mace_ray.storage.lease) ------------------------
    # S3 conditional writes: PutObject with If-None-Match: * (AWS since 08/2024) or If-Match:
    # <etag> (AWS since 11/2024); the server decides atomically, so of two racing requests
    # exactly one succeeds and the other gets 412 PreconditionFailed. Verified on SeaweedFS
    # 4.48 (12 racing clients, one winner in each of 80 rounds) and required of the server:
    # one that ignores these headers would make every conditional write unconditional.
    # A request retried after a lost response (botocore or our retrier) can fail its
    # precondition because its first attempt succeeded: False then means "not done by this
    # attempt"; callers that must know re-read the object (RunLock compares the owner).

    def _conditional(self, key: str, request: Callable[[], Any]) -> bool:
        """``request()`` under a precondition: True when applied, False when the precondition
        failed (412, or 404 for an object that is gone). 409 ConditionalRequestConflict (AWS:
        a concurrent operation on the key won the race) is retried, as AWS advises."""

        def attempt() -> bool | None:
            try:
                request()
                return True
            except ClientError as e:
                code, status = error_code(e), http_status(e)
                if status == 412 or code == "PreconditionFailed":
                    return False
                if code in ("NoSuchKey", "404") or (status == 404 and code != "NoSuchBucket"):
                    return False
                if code == "ConditionalRequestConflict":
                    return None
                raise

        for i in range(6):
            done = self._call(self.uri(key), attempt)
            if done is not None:
                return done
            time.sleep(0.05 * 2**i)
        raise StorageError(
            f"{self.uri(key)}: S3 conditional request kept conflicting (ConditionalRequestConflict)"
        )

    def _checked(self, key: str) -> str:
        check_key(key)
        if _basename(key) in RESERVED:
            raise StorageError(f"{self.uri(key)}: the name {_basename(key)!r} is reserved for folder markers")
        return self.loc.key(key)

    def create_exclusive(self, key: str, data: bytes) -> bool:
        """Write ``key`` only if no object has that name (If-None-Match: *); False if one does."""
        full = self._checked(key)
        return self._conditional(
            key, lambda: self.client.put_object(Bucket=self.bucket, Key=full, Body=data, IfNoneMatch="*")
        )

    def read_versioned(self, key: str) -> tuple[bytes, str] | None:
        """``(data, ETag)`` of ``key``, or None if absent."""
        return self._get(key, self._checked(key))

    def replace_if(self, key: str, data: bytes, version: str) -> bool:
        """Replace ``key`` only if its ETag is still ``version`` (If-Match)."""
        full = self._checked(key)
        return self._conditional(
            key, lambda: self.client.put_object(Bucket=self.bucket, Key=full, Body=data, IfMatch=version)
        )

    def delete_if(self, key: str, version: str) -> bool:
        """Delete ``key`` only if its ETag is still ``version``.

        DeleteObject with If-Match is honoured by SeaweedFS 4.48 and by AWS, but older
        S3-compatible servers ignore the header and delete unconditionally; so the ETag is
        compared first (HEAD) as well: on such a server a replace that lands between the
        HEAD and the DELETE is the only case in which another writer's object is removed.
        """
        full = self._checked(key)

        def head() -> str | None:
            try:
                return str(self.client.head_object(Bucket=self.bucket, Key=full)["ETag"])
            except ClientError as e:
                if http_status(e) == 404 and error_code(e) != "NoSuchBucket":
                    return None
                raise

        if self._call(self.uri(key), head) != version:
            return False
        return self._conditional(
            key, lambda: self.client.delete_object(Bucket=self.bucket, Key=full, IfMatch=version)
        )


def _reopen(url: str, *args: Any) -> S3Storage:
    endpoint, retry_seconds, threshold, chunk, concurrency = args
    return S3Storage(
        url,
        endpoint,
        retry_seconds=retry_seconds,
        multipart_threshold=threshold,
        multipart_chunksize=chunk,
        concurrency=concurrency,
    )
