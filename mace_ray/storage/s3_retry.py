"""How S3 failures are classified and retried (used by ``mace_ray.storage.s3``).

Three kinds of failure, three treatments:
- transient (throttling, 5xx, connection refused/reset, timeouts): retried with capped
  exponential backoff and jitter until a time budget runs out, then
  ``StorageUnavailableError`` (an infrastructure failure: the run can be resumed);
- fatal (bad credentials, access denied, missing bucket): never retried, a one-line
  ``StorageError`` naming the bucket or URI;
- anything else (e.g. NoSuchKey): returned to the caller, which knows what it means.

botocore's own "standard" retries run first (a few quick attempts, with a retry quota);
this module adds a time-based budget on top, because botocore's quota drains during an
outage and its attempt count does not say how long S3 may be gone.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import urllib3.exceptions
from botocore.exceptions import (
    ClientError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError
from s3transfer.exceptions import RetriesExceededError

from mace_ray.storage.base import StorageError, StorageUnavailableError

log = logging.getLogger("mace_ray.s3")

T = TypeVar("T")

# Error codes that mean "try again later" (S3 and S3-compatible servers).
TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestLimitExceeded",
        "TooManyRequests",
        "TooManyRequestsException",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "OperationAborted",
        "PriorRequestNotComplete",
    }
)

# Error codes that no retry can fix; the message says what to check, never the keys.
AUTH_CODES = {
    "InvalidAccessKeyId": "the access key is not known to the server",
    "SignatureDoesNotMatch": "the secret key does not match the access key",
    "AccessDenied": "access denied",
    "AllAccessDisabled": "access denied",
    "AccountProblem": "access denied",
    "ExpiredToken": "the session token has expired",
    "InvalidToken": "the session token is invalid",
    "TokenRefreshRequired": "the session token has expired",
    "RequestTimeTooSkewed": "this machine's clock differs too much from the server's",
    "403": "access denied or unknown credentials",
}

NETWORK_ERRORS: tuple[type[BaseException], ...] = (
    BotoConnectionError,  # refused, connect timeout, DNS, proxy
    HTTPClientError,  # reset, read timeout, streaming error
    IncompleteReadError,
    urllib3.exceptions.HTTPError,  # raised while a response body is being read
    ConnectionError,  # builtin: reset/refused/aborted surfacing from sockets
    TimeoutError,
)


def error_code(e: BaseException) -> str:
    if isinstance(e, ClientError):
        return str(e.response.get("Error", {}).get("Code", ""))
    return ""


def http_status(e: BaseException) -> int:
    if isinstance(e, ClientError):
        return int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return 0


def unwrap(e: BaseException) -> BaseException:
    """The underlying error of s3transfer's 'retries exceeded' wrapper."""
    if isinstance(e, RetriesExceededError) and e.last_exception is not None:
        return e.last_exception
    return e


def is_transient(e: BaseException) -> bool:
    e = unwrap(e)
    if isinstance(e, NETWORK_ERRORS):
        return True
    if isinstance(e, ClientError):
        status = http_status(e)
        return error_code(e) in TRANSIENT_CODES or status == 429 or status >= 500
    return False


def fatal_error(e: BaseException, what: str, bucket: str, endpoint: str) -> StorageError | None:
    """A StorageError for failures no retry can fix, or None. ``what`` names the URI."""
    e = unwrap(e)
    if isinstance(e, NoCredentialsError | PartialCredentialsError):
        return StorageError(
            f"{what}: no usable S3 credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "or AWS_PROFILE)"
        )
    code = error_code(e)
    if code in AUTH_CODES:
        return StorageError(
            f"{what}: S3 at {endpoint} refused the request for bucket {bucket!r}: {AUTH_CODES[code]} "
            f"({code}); check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
        )
    if code == "NoSuchBucket":
        return StorageError(f"{what}: bucket {bucket!r} does not exist at {endpoint}")
    return None


@dataclass(frozen=True)
class RetryPolicy:
    """A time budget for transient failures; backoff doubles from ``base`` up to ``cap``."""

    budget_s: float = 120.0
    base_s: float = 0.5
    cap_s: float = 8.0

    def delay(self, attempt: int) -> float:
        # Full-size step with jitter in [50%, 100%]: spreads many workers, keeps progress.
        step = min(self.cap_s, self.base_s * 2**attempt)
        return step * (0.5 + random.random() / 2)


class Retrier:
    """Runs one S3 operation with the policy; turns failures into storage errors."""

    def __init__(self, policy: RetryPolicy, bucket: str, endpoint: str) -> None:
        self.policy = policy
        self.bucket = bucket
        self.endpoint = endpoint

    def fatal(self, e: BaseException, what: str) -> StorageError | None:
        return fatal_error(e, what, self.bucket, self.endpoint)

    def unavailable(self, e: BaseException, what: str, attempts: int, seconds: float) -> Exception:
        e = unwrap(e)
        detail = error_code(e) or type(e).__name__
        return StorageUnavailableError(
            f"{what}: S3 at {self.endpoint} unavailable ({detail}) after {attempts} attempts over "
            f"{seconds:.0f}s; completed work is kept, rerun the same command to resume"
        )

    def raise_if_permanent(self, e: BaseException, what: str) -> None:
        """Raise what no retry can fix: a StorageError when fatal, else ``e`` itself."""
        fatal = self.fatal(e, what)
        if fatal is not None:
            raise fatal from None
        if not is_transient(e):
            raise e

    def wait_or_raise(self, e: BaseException, what: str, attempt: int, started: float) -> None:
        """Sleep before the next attempt, or raise if the error is not transient or time is up."""
        self.raise_if_permanent(e, what)
        elapsed = time.monotonic() - started
        left = self.policy.budget_s - elapsed
        if left <= 0:
            raise self.unavailable(e, what, attempt + 1, elapsed) from None
        pause = min(self.policy.delay(attempt), left)
        log.warning(
            "%s: S3 %s (%s), retrying in %.1fs (%.0fs of retry budget left)",
            what,
            "unreachable" if isinstance(unwrap(e), NETWORK_ERRORS) else "busy",
            error_code(unwrap(e)) or type(unwrap(e)).__name__,
            pause,
            left,
        )
        time.sleep(pause)

    def call(self, what: str, fn: Callable[[], T]) -> T:
        """``fn()`` retried on transient errors; other ClientErrors propagate unchanged."""
        started = time.monotonic()
        attempt = 0
        while True:
            try:
                return fn()
            except Exception as e:  # classified in wait_or_raise; non-S3 errors re-raised as they are
                self.wait_or_raise(e, what, attempt, started)
                attempt += 1
