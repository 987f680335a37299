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

Retries (see ``mace_ray.s3retry``). botocore "standard" retries (3 attempts) plus a time
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

import json
import os
import re
import time
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import boto3
from boto3.s3.transfer import TransferConfig, create_transfer_manager
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, ProfileNotFound

from mace_ray.s3retry import Retrier, RetryPolicy, error_code, http_status
from mace_ray.storage import StorageError, check_key

COMPLETE = ".mace-complete"
PARTIAL = ".mace-partial"
RESERVED = frozenset({COMPLETE, PARTIAL})

MB = 1024 * 1024
# Parts of 16 MiB: a 3.4 GB SD UNet is ~210 parts (S3 allows 10,000, so files up to
# 160 GB), a 235 MB text encoder still spreads over all 8 connections, and a failed part
# re-sends at most 16 MiB. On loopback the part size (8-64 MiB) and concurrency (4-16) made
# no difference (benchmarks/README.md): the server is the bottleneck there, not the client.
MULTIPART_THRESHOLD = 16 * MB
MULTIPART_CHUNK = 16 * MB
CONCURRENCY = 8

# AWS bucket naming rules (3-63 chars, lowercase letters, digits, dots, hyphens).
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_AWS_HOST = re.compile(r"(^|\.)amazonaws\.com(\.cn)?$|(^|\.)api\.aws$")


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # "" or "a/b" (no leading or trailing slash)

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def rel(self, full: str) -> str:
        return full[len(self.prefix) + 1 :] if self.prefix else full


def parse_s3_url(url: str) -> S3Location:
    """``s3://bucket[/prefix]`` -> S3Location; StorageError naming ``url`` when malformed."""
    if url[:5].lower() != "s3://":
        raise StorageError(f"{url!r} is not an s3:// URL")
    rest = url[5:]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise StorageError(f"S3 URL {url!r} has no bucket (expected s3://bucket/prefix)")
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise StorageError(
            f"S3 URL {url!r}: {bucket!r} is not a valid bucket name "
            "(3-63 lowercase letters, digits, '.' or '-')"
        )
    prefix = prefix.strip("/")
    if prefix:
        try:
            check_key(prefix)
        except StorageError:
            raise StorageError(
                f"S3 URL {url!r}: invalid prefix {prefix!r} (empty, '.' or '..' parts)"
            ) from None
    return S3Location(bucket, prefix)


def safe_endpoint(url: str | None) -> str:
    """The endpoint for messages: no user:password@ part, 'AWS' when unset."""
    if not url:
        return "AWS"
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
    except ValueError:  # a malformed port: still never echo a password
        return url.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def addressing_style() -> str | None:
    style = os.environ.get("MACE_S3_ADDRESSING_STYLE", "").strip().lower()
    if style and style not in ("path", "virtual", "auto"):
        raise StorageError(f"MACE_S3_ADDRESSING_STYLE={style!r}: expected path, virtual or auto")
    return style or None


def _retry_budget() -> float:
    raw = os.environ.get("MACE_S3_RETRY_SECONDS", "")
    if not raw:
        return RetryPolicy.budget_s
    try:
        value = float(raw)
    except ValueError:
        raise StorageError(f"MACE_S3_RETRY_SECONDS={raw!r}: expected a number of seconds") from None
    if value < 0:
        raise StorageError(f"MACE_S3_RETRY_SECONDS={raw!r}: must not be negative")
    return value


def make_client(
    url: str,
    s3_endpoint: str | None,
    style: str | None,
    pool: int,
    *,
    connect_timeout: float = 5,
    read_timeout: float = 60,
    max_attempts: int = 3,
) -> Any:
    """A boto3 S3 client from the standard AWS configuration; errors name ``url``.

    The timeouts and botocore's attempt count suit long runs; the preflight probe
    (``mace_ray.preflight``) passes short ones so that a dead endpoint fails in seconds.
    """

    def build(addressing: str) -> Any:
        config = Config(
            retries={"mode": "standard", "max_attempts": max_attempts},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_pool_connections=pool,
            s3={"addressing_style": addressing},
            user_agent_extra="mace-ray",
        )
        return boto3.session.Session().client("s3", endpoint_url=s3_endpoint or None, config=config)

    def is_aws(endpoint: str) -> bool:
        return bool(_AWS_HOST.search(urlsplit(endpoint).hostname or ""))

    try:
        if style is None and s3_endpoint:
            style = "auto" if is_aws(s3_endpoint) else "path"
        client = build(style or "auto")
        # An endpoint from the environment or a profile is known only once botocore has
        # resolved it: rebuild path-style if it is not AWS.
        if style is None and not is_aws(client.meta.endpoint_url):
            client = build("path")
    except ProfileNotFound as e:
        raise StorageError(f"{url}: AWS profile {e.kwargs.get('profile')!r} is not configured") from None
    except ValueError as e:  # botocore: "Invalid endpoint: ..."
        raise StorageError(
            f"{url}: S3 endpoint {safe_endpoint(s3_endpoint)!r} is not a valid URL "
            f"(expected http(s)://host:port): {str(e).splitlines()[0][:200]}"
        ) from None
    except BotoCoreError as e:
        raise StorageError(f"{url}: cannot configure the S3 client: {type(e).__name__}") from None
    return client


@dataclass(frozen=True)
class DirEntry:
    rel: str  # key relative to the folder
    key: str  # full S3 key
    size: int
    etag: str


def _basename(key: str) -> str:
    return key.rsplit("/", 1)[-1]


def _hidden(rel: str) -> bool:
    """Folder placeholders (S3 consoles), markers and dot-files: never listed or fetched."""
    return rel.endswith("/") or any(part.startswith(".") for part in rel.split("/"))


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
        budget = _retry_budget() if retry_seconds is None else retry_seconds
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

    def _uri(self, key: str) -> str:
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

        return self._call(self._uri(self.loc.rel(full)), head)

    def _list_page(self, full_prefix: str, token: str | None) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": full_prefix, "MaxKeys": self.page_size}
        if token:
            kwargs["ContinuationToken"] = token
        return self._call(self._uri(self.loc.rel(full_prefix)), lambda: self.client.list_objects_v2(**kwargs))

    def _iter_objects(self, full_prefix: str) -> Iterator[dict[str, Any]]:
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
                    f"{self._uri(self.loc.rel(full_prefix))}: listing truncated without a token"
                )

    def _put(self, full: str, data: bytes) -> None:
        self._call(
            self._uri(self.loc.rel(full)),
            lambda: self.client.put_object(Bucket=self.bucket, Key=full, Body=data),
        )

    def _delete_keys(self, keys: list[str], what: str) -> None:
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
            raise StorageError(
                f"{self._uri(key)}: the name {_basename(key)!r} is reserved for folder markers"
            )
        self._put(self.loc.key(key), data)

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

        return self._call(self._uri(key), get)

    def read_bytes(self, key: str) -> bytes:
        got = self._get(key, self.loc.key(check_key(key)))
        if got is None:
            raise StorageError(f"{self._uri(key)} does not exist")
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
        rels = [self.loc.rel(o["Key"]) for o in self._iter_objects(full)]
        present = set(rels)
        uncommitted = [
            r[: -len(PARTIAL)]
            for r in rels
            if _basename(r) == PARTIAL and r[: -len(PARTIAL)] + COMPLETE not in present
        ]
        return sorted(r for r in rels if not _hidden(r) and not any(r.startswith(u) for u in uncommitted))

    def put_dir(self, local_dir: Path, key: str) -> None:
        """Upload a folder under ``key``, replacing what was there; visible once committed."""
        check_key(key)
        local_dir = Path(local_dir)
        if not local_dir.is_dir():
            raise StorageError(f"put_dir: {str(local_dir)!r} is not a folder")
        files = {p.relative_to(local_dir).as_posix(): p for p in sorted(local_dir.rglob("*")) if p.is_file()}
        for rel in files:
            if rel in RESERVED:
                raise StorageError(f"put_dir: {str(local_dir / rel)!r} has a reserved marker name")
        full = self.loc.key(key)
        what = self._uri(key)
        # 1-2: mark as being written, uncommit, clear older or partial contents.
        self._put(f"{full}/{PARTIAL}", b"")
        self._delete_keys([f"{full}/{COMPLETE}"], what)
        old = [o["Key"] for o in self._iter_objects(full + "/") if o["Key"] != f"{full}/{PARTIAL}"]
        self._delete_keys(old, what)
        # 3: every file.
        self._transfer(
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
        self._put(f"{full}/{COMPLETE}", json.dumps(marker, indent=1, sort_keys=True).encode())
        self._delete_keys([f"{full}/{PARTIAL}"], what)

    def get_dir(self, key: str, local_dir: Path, include: Collection[str] | None = None) -> None:
        """Download folder ``key`` into ``local_dir`` (merged into what is there, as
        ``shutil.copytree(..., dirs_exist_ok=True)`` does); downloads stream to disk.
        ``include``: only these top-level files and subfolders (default: everything)."""
        entries = self.dir_entries(key, include)
        local_dir = Path(local_dir)
        local_dir.mkdir(parents=True, exist_ok=True)
        for e in entries:
            (local_dir / e.rel).parent.mkdir(parents=True, exist_ok=True)
        self._transfer(
            self._uri(key),
            entries,
            lambda tm, e: tm.download(self.bucket, e.key, str(local_dir / e.rel)),
            lambda e: e.key,
        )
        for e in entries:
            got = (local_dir / e.rel).stat().st_size
            if got != e.size:
                raise StorageError(f"{self._uri(key)}/{e.rel}: downloaded {got} bytes, expected {e.size}")

    def delete_prefix(self, prefix: str) -> None:
        full = self.loc.key(check_key(prefix))
        what = self._uri(prefix)
        # The commit marker goes first, so a crash midway leaves nothing that looks complete.
        self._delete_keys([f"{full}/{COMPLETE}"], what)
        keys = [o["Key"] for o in self._iter_objects(full + "/")]
        self._delete_keys([*keys, full], what)

    # --- conditional operations (leases, see mace_ray.runlock) ------------------------
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
            done = self._call(self._uri(key), attempt)
            if done is not None:
                return done
            time.sleep(0.05 * 2**i)
        raise StorageError(
            f"{self._uri(key)}: S3 conditional request kept conflicting (ConditionalRequestConflict)"
        )

    def _checked(self, key: str) -> str:
        check_key(key)
        if _basename(key) in RESERVED:
            raise StorageError(
                f"{self._uri(key)}: the name {_basename(key)!r} is reserved for folder markers"
            )
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

        if self._call(self._uri(key), head) != version:
            return False
        return self._conditional(
            key, lambda: self.client.delete_object(Bucket=self.bucket, Key=full, IfMatch=version)
        )

    # --- folders ---------------------------------------------------------------------

    def dir_entries(self, key: str, include: Collection[str] | None = None) -> list[DirEntry]:
        """The files ``get_dir(key, include=...)`` fetches, with sizes and ETags. Relative
        paths are checked so that no download can leave the target folder."""
        full = self.loc.key(check_key(key))
        what = self._uri(key)
        objects: dict[str, dict[str, Any]] = {}
        for o in self._iter_objects(full + "/"):
            rel = o["Key"][len(full) + 1 :]
            if rel and not rel.endswith("/"):
                try:
                    check_key(rel)
                except StorageError:
                    raise StorageError(f"{what}: object name {rel!r} cannot be a local file name") from None
                objects[rel] = o
        out = self._committed_entries(key, objects)
        if include is not None:
            out = [e for e in out if e.rel.split("/")[0] in include]
        return out

    def _committed_entries(self, key: str, objects: dict[str, dict[str, Any]]) -> list[DirEntry]:
        """A committed folder: exactly the files its marker lists, each present with the
        recorded size. An uncommitted one: an error. A plain folder of objects (not written
        by put_dir): its objects, dot-files excluded."""
        what = self._uri(key)
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
            raise StorageError(f"{what} is incomplete (its upload was interrupted); write it again")
        out = [
            DirEntry(rel, o["Key"], int(o["Size"]), str(o.get("ETag", "")))
            for rel, o in sorted(objects.items())
            if not _hidden(rel)
        ]
        if not out:
            raise StorageError(f"{what} does not exist")
        return out

    def _transfer(
        self,
        what: str,
        items: list[Any],
        submit: Callable[[Any, Any], Future],
        name: Callable[[Any], str],
    ) -> None:
        """Run transfers in parallel; retry the failed ones, in rounds, within the budget."""
        started = time.monotonic()
        attempt = 0
        pending = list(items)
        while pending:
            failed: list[tuple[Any, BaseException]] = []
            with create_transfer_manager(self.client, self.transfer_config) as tm:
                futures = [(item, submit(tm, item)) for item in pending]
                for item, fut in futures:
                    try:
                        fut.result()
                    except Exception as e:  # classified below, once every transfer has ended
                        failed.append((item, e))
            if not failed:
                return
            try:
                for item, err in failed:
                    self.retrier.raise_if_permanent(err, f"{what} ({self.loc.rel(name(item))})")
                item, err = failed[0]
                self.retrier.wait_or_raise(err, f"{what} ({self.loc.rel(name(item))})", attempt, started)
            except ClientError as e:
                raise StorageError(
                    f"{what}: S3 transfer failed ({error_code(e) or http_status(e)})"
                ) from None
            attempt += 1
            pending = [item for item, _ in failed]


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
