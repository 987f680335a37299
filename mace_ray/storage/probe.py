"""The storage check that runs in the first seconds of a command, before any model work.

It fails with one line (a ``MaceError``, so the CLI prints it and exits 2) instead of a
traceback minutes later:

- ``preflight_storage``: the output is usable. For ``s3://`` one bounded probe (short
  timeouts, a budget of seconds, not the run's retry budget of minutes): the bucket
  answers, exists, and the credentials can write and delete there. The probe object is a
  hidden key (``<prefix>/.mace-probe/<uuid>``, never listed by ``S3Storage``) and is
  deleted again. Local folders get ``LocalStorage``'s checks, which create nothing.

A device named with ``--device`` is already checked by ``mace_core.models.pick_device``.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from botocore.exceptions import BotoCoreError, ClientError

from mace_ray.storage.base import Storage, StorageError
from mace_ray.storage.open_store import open_storage
from mace_ray.storage.s3_retry import (
    NETWORK_ERRORS,
    BoundedRetries,
    error_code,
    fatal_error,
    http_status,
    is_transient,
)

log = logging.getLogger("mace_ray")

T = TypeVar("T")

PROBE_DIR = ".mace-probe"  # dot-prefixed: hidden from S3Storage.list like its markers
PROBE_BODY = b"mace-ray write probe; safe to delete\n"
DENIED = frozenset({"AccessDenied", "AllAccessDisabled", "403"})


def preflight_storage(url: str, s3_endpoint: str | None = None, budget_s: float = 15.0) -> Storage:
    """Fail within about ``budget_s`` seconds, in one line, if ``url`` cannot take the run;
    else the storage of ``url``, opened (the one object the run's preparation uses).

    Opening ``S3Storage`` waits out the run's whole retry budget (minutes, right for an
    outage mid-run) and then says "rerun to resume", which is wrong when nothing ran. This
    probe bounds every request and names what failed: unreachable endpoint, missing
    bucket, refused credentials, read-only credentials, or no right to delete.
    """
    if url[:5].lower() != "s3://":
        return open_storage(url, s3_endpoint=s3_endpoint)  # LocalStorage: checks, creates nothing
    _S3Probe(url, s3_endpoint, budget_s).run()
    return open_storage(url, s3_endpoint=s3_endpoint)


class _S3Probe:
    """One bounded round of head-bucket, put, delete against an ``s3://`` URL."""

    def __init__(self, url: str, s3_endpoint: str | None, budget_s: float) -> None:
        # Imported here: boto3's S3 pieces are needed only for s3:// outputs.
        from mace_ray.storage.s3_client import addressing_style, make_client, parse_s3_url, safe_endpoint

        self.loc = parse_s3_url(url)
        self.url = self.loc.url
        self.bucket = self.loc.bucket
        self.budget_s = budget_s
        # A dead host costs a connect timeout per attempt, a stalled server a read timeout:
        # both a fraction of the budget, so that a few attempts fit. The client retries each
        # request while a whole attempt still fits before the probe's deadline (all steps).
        self.retries = BoundedRetries(
            budget_s, min(3.0, max(0.5, budget_s / 5)), min(5.0, max(1.0, budget_s / 5)), quiet=True
        )
        self.deadline = self.retries.until = time.monotonic() + budget_s
        self.client = make_client(self.url, s3_endpoint, addressing_style(), pool=2, retries=self.retries)
        self.endpoint = safe_endpoint(s3_endpoint or self.client.meta.endpoint_url)
        self.key = self.loc.key(f"{PROBE_DIR}/{uuid.uuid4().hex}")

    def run(self) -> None:
        started = time.monotonic()
        try:
            self._head_bucket()
            version = self._put()
            self._delete(version)
        finally:
            self.client.close()
        log.debug(
            "storage preflight of %s at %s: ok in %.1fs", self.url, self.endpoint, time.monotonic() - started
        )

    # --- steps -----------------------------------------------------------------------

    def _head_bucket(self) -> None:
        try:
            self._bounded("reach the bucket", lambda: self.client.head_bucket(Bucket=self.bucket))
        except ClientError as e:
            if http_status(e) == 404:
                return self._confirm_missing()
            if http_status(e) != 403:
                raise self._failed("reach the bucket", e) from None
            # A HEAD error has no body: a one-key listing gives the precise code (listing allowed
            # but HEAD refused, an odd policy: the write probe decides).
            try:
                self._bounded("list the bucket", self._list_one)
            except ClientError as e2:
                raise self._failed("list the bucket", e2) from None

    def _confirm_missing(self) -> None:
        """After a HEAD 404: S3 servers say NoSuchBucket to a listing; anything else that
        answers 404 (a web server, a proxy in front of a dead host) is not an S3 server."""
        try:
            self._bounded("list the bucket", self._list_one)  # NoSuchBucket: a StorageError
        except ClientError as e:
            raise StorageError(
                f"{self.url}: {self.endpoint} answered HTTP {http_status(e) or '404'} without an S3 error "
                "for the bucket: is it an S3 server? Check --s3-endpoint (or AWS_ENDPOINT_URL)"
            ) from None
        # Listed although HEAD said 404 (an odd server): the write probe decides.

    def _list_one(self) -> Any:
        return self.client.list_objects_v2(Bucket=self.bucket, Prefix=self.loc.prefix, MaxKeys=1)

    def _put(self) -> str | None:
        """Write the probe object; its version id on a versioned bucket."""
        try:
            resp = self._bounded(
                "write a probe object",
                lambda: self.client.put_object(Bucket=self.bucket, Key=self.key, Body=PROBE_BODY),
            )
        except ClientError as e:
            if error_code(e) in DENIED:
                raise StorageError(
                    f"{self.url}: the S3 credentials can read bucket {self.bucket!r} at {self.endpoint} "
                    f"but not write to it ({error_code(e)}): read-only credentials? The run writes its "
                    "results there"
                ) from None
            raise self._failed("write a probe object", e) from None
        version = resp.get("VersionId")
        return version if version and version != "null" else None

    def _delete(self, version: str | None) -> None:
        """Remove the probe object (its version too, so nothing stays on a versioned bucket)."""
        left = f"{self.loc.url}/{self.loc.rel(self.key)}"
        # Cleanup is worth a few seconds more than the budget: the object exists now.
        self.deadline = self.retries.until = max(self.deadline, time.monotonic() + min(self.budget_s, 5.0))
        try:
            if version:
                try:
                    self._bounded("delete the probe object", lambda: self._delete_one(version))
                    return
                except ClientError as e:
                    if error_code(e) not in DENIED:
                        raise
                    log.warning(
                        "%s: no right to delete object versions; the probe leaves a noncurrent version of %s",
                        self.url,
                        left,
                    )
            self._bounded("delete the probe object", lambda: self._delete_one(None))
        except ClientError as e:
            if error_code(e) in DENIED:
                raise StorageError(
                    f"{self.url}: the S3 credentials can write to bucket {self.bucket!r} at {self.endpoint} "
                    f"but not delete ({error_code(e)}), which resuming and replacing results need; "
                    f"the probe object {left} is left behind"
                ) from None
            raise self._failed("delete the probe object", e) from None
        except StorageError as e:  # unreachable since the write, or no answer: the object may be there
            raise StorageError(f"{e}; the probe object {left} may be left behind") from None

    def _delete_one(self, version: str | None) -> Any:
        kwargs = {"VersionId": version} if version else {}
        return self.client.delete_object(Bucket=self.bucket, Key=self.key, **kwargs)

    # --- retries and messages --------------------------------------------------------

    def _bounded(self, what: str, fn: Callable[[], T]) -> T:
        """``fn()`` (its requests retried by the client until the deadline). A StorageError when
        the endpoint stays unreachable or busy, for failures no retry can fix (credentials,
        missing bucket) and for botocore's own errors; a ClientError with another code
        propagates for the step to name."""
        try:
            return fn()
        except Exception as e:
            if is_transient(e):
                raise self._unreachable(what, e) from None
            fatal = fatal_error(e, self.url, self.bucket, self.endpoint)
            if fatal is not None and error_code(e) not in DENIED:
                raise fatal from None
            if isinstance(e, BotoCoreError):
                raise self._failed(what, e) from None
            raise

    def _unreachable(self, what: str, e: BaseException) -> StorageError:
        network = isinstance(e, NETWORK_ERRORS)
        state = "unreachable" if network else "not answering normally"
        hint = "check --s3-endpoint (or AWS_ENDPOINT_URL) and the network" if network else "try again later"
        return StorageError(
            f"{self.url}: S3 endpoint {self.endpoint} {state} ({_detail(e)}; could not {what} "
            f"within {self.budget_s:.0f}s): {hint}"
        )

    def _failed(self, what: str, e: BaseException) -> StorageError:
        fatal = fatal_error(e, self.url, self.bucket, self.endpoint)
        if fatal is not None:
            return fatal
        return StorageError(f"{self.url}: S3 at {self.endpoint}: could not {what} ({_detail(e)})")


def _detail(e: BaseException) -> str:
    return error_code(e) or (str(http_status(e)) if http_status(e) else type(e).__name__)
