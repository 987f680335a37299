"""How S3 requests are retried, and how their failures are classified (``mace_ray.storage.s3``).

``BoundedRetries``: botocore's "standard" mode's decisions and backoff (throttling, 5xx,
connection errors, timeouts; exponential backoff with full jitter), run by a ``needs-retry``
handler with two changes. A time bound instead of an attempt count: a retry is made only if a
whole attempt (connect + read timeout) still fits in the request's budget after the backoff, so
no request waits longer than its budget on an S3 that does not answer, while refused connections
are retried for nearly all of it (3 x (5 + 60) s against a stalled server is 195 s, against a
refused one 0.2 s). No client-wide retry quota: the standard mode's (500 tokens, 14 a retry) is
spent within seconds when 8 transfers meet one outage. ("adaptive" mode's client-side limiter
cannot see that S3 throttles per prefix across all of a run's processes.) 409 conflicts (a
concurrent request on the key won) are retried too, as AWS advises; each retry is a warning.

``classify``, once botocore gives up: bad credentials, access denied or a missing bucket are a
one-line ``StorageError`` naming the bucket and URI (never retried); a network error, or an
error the handler would have retried but for the budget (it marks the response), is
``StorageUnavailableError`` (completed work is kept, rerun to resume); any other ClientError a
one-line ``StorageError`` with its code.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import urllib3.exceptions
from botocore.exceptions import (
    ClientError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError
from botocore.retries import standard
from s3transfer.exceptions import RetriesExceededError

from mace_ray.storage.base import StorageError, StorageUnavailableError

log = logging.getLogger("mace_ray.s3")

# A backstop only: the time budget ends retries long before this many attempts.
MAX_ATTEMPTS = 50
# Conflicts S3 resolves by letting one request win: retried (not in botocore's standard list).
RETRY_CODES = frozenset({"ConditionalRequestConflict", "OperationAborted"})
RETRYABLE = "MaceRetryable"  # the response metadata of an error the handler would retry

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


def timeouts(budget_s: float) -> tuple[float, float]:
    """(connect, read) timeouts for a request budget: 5 s and 20 s for budgets from 40 s up
    (a read timeout bounds a stall between bytes, not a whole transfer), smaller below, so
    that one whole attempt always fits within the budget (3/4 of it)."""
    return min(5.0, max(0.05, budget_s / 4)), min(20.0, max(0.1, budget_s / 2))


def error_code(e: BaseException) -> str:
    return str(e.response.get("Error", {}).get("Code", "")) if isinstance(e, ClientError) else ""


def http_status(e: BaseException) -> int:
    if isinstance(e, ClientError):
        return int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return 0


def unwrap(e: BaseException) -> BaseException:
    """The underlying error of s3transfer's 'retries exceeded' wrapper."""
    return e.last_exception if isinstance(e, RetriesExceededError) and e.last_exception is not None else e


def detail(e: BaseException) -> str:
    return error_code(unwrap(e)) or type(unwrap(e)).__name__


def is_transient(e: BaseException) -> bool:
    """A network error, or an error response the retry handler would have retried."""
    e = unwrap(e)
    retryable = isinstance(e, ClientError) and e.response.get("ResponseMetadata", {}).get(RETRYABLE)
    return isinstance(e, NETWORK_ERRORS) or bool(retryable)


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


def classify(
    e: BaseException, what: str, bucket: str, endpoint: str, seconds: float, budget_s: float
) -> Exception | None:
    """The storage error to raise for a failed S3 request, or None for an error that is not
    S3's (the caller re-raises it unchanged: a bug, or a RunLocked from a write guard)."""
    fatal = fatal_error(e, what, bucket, endpoint)
    if fatal is not None:
        return fatal
    if is_transient(e):
        return StorageUnavailableError(
            f"{what}: S3 at {endpoint} unavailable ({detail(e)}), given up after {seconds:.1f}s (retry "
            f"budget {budget_s:g}s, MACE_S3_RETRY_SECONDS); completed work is kept, rerun the same "
            "command to resume"
        )
    inner = unwrap(e)
    if isinstance(inner, ClientError):
        return StorageError(f"{what}: S3 request failed ({error_code(inner) or http_status(inner)})")
    return None


class BoundedRetries:
    """botocore's standard-mode retry decisions, within a time budget per request (see the
    module docstring); ``config()`` gives the client's timeouts, ``install(client)`` hooks it.

    ``until``: an absolute ``time.monotonic()`` deadline that also ends retries (the preflight
    probe's budget for all its requests together). ``quiet``: no warning per retry.
    """

    def __init__(
        self,
        budget_s: float,
        connect_s: float | None = None,
        read_s: float | None = None,
        *,
        quiet: bool = False,
    ) -> None:
        default_connect, default_read = timeouts(budget_s)
        self.budget_s = budget_s
        self.connect_s = default_connect if connect_s is None else connect_s
        self.read_s = default_read if read_s is None else read_s
        self.attempt_s = self.connect_s + self.read_s  # the longest one attempt waits without an answer
        self.until: float | None = None
        self.quiet = quiet
        self._adapter = standard.RetryEventAdapter()
        self._conditions = standard.StandardRetryConditions(max_attempts=MAX_ATTEMPTS + 1)
        self._backoff = standard.ExponentialBackoff(
            service_name="s3", throttling_detector=standard.ThrottlingErrorDetector(self._adapter)
        )

    def install(self, client: Any) -> None:
        """Hook on ``client``, built with ``config()`` (botocore's own retries off)."""
        client.meta.events.register("before-parameter-build.s3", self._started)
        client.meta.events.register("needs-retry.s3", self._needs_retry)

    def config(self) -> dict[str, Any]:
        """botocore Config arguments: these timeouts, and botocore's own retries off (one
        attempt, so its retry quota is never consulted): the handler installed retries."""
        return {
            "retries": {"mode": "standard", "total_max_attempts": 1},
            "connect_timeout": self.connect_s,
            "read_timeout": self.read_s,
        }

    def _started(self, params: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
        context["mace_started"] = time.monotonic()
        context["mace_what"] = f"s3://{params.get('Bucket', '')}/{params.get('Key', '')}".rstrip("/")

    def _needs_retry(self, **kwargs: Any) -> float | None:
        """The backoff before the next attempt, or None: no retry."""
        context = self._adapter.create_retry_context(**kwargs)
        code = context.get_error_code()
        if not (code in RETRY_CODES or self._conditions.is_retryable(context)):
            return None
        context.add_retry_metadata(**{RETRYABLE: True})  # for classify, if this is the last attempt
        self._adapter.adapt_retry_response_from_context(context)
        delay = self._backoff.delay_amount(context)
        request = context.request_context
        now = time.monotonic()
        left = self.budget_s - (now - request.get("mace_started", now))
        if self.until is not None:
            left = min(left, self.until - now)
        if context.attempt_number >= MAX_ATTEMPTS or delay + self.attempt_s > left:
            return None  # the next attempt might not end within the budget: give up now
        if not self.quiet:
            cause = kwargs.get("caught_exception")
            log.warning(
                "%s: S3 %s (%s), retrying in %.1fs (%.0fs of retry budget left)",
                request.get("mace_what", "s3"),
                "unreachable" if isinstance(cause, NETWORK_ERRORS) else "busy",
                code or (type(cause).__name__ if cause is not None else "?"),
                delay,
                left,
            )
        return delay
