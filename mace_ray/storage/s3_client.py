"""Addressing S3: ``s3://bucket/prefix`` URLs (``parse_s3_url``), endpoints as messages show them
(``safe_endpoint``), and the boto3 client every S3 user of mace-ray builds (``make_client``).

The client: credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY(/AWS_SESSION_TOKEN), AWS_PROFILE or
an instance role), region and endpoint (``s3_endpoint``, else AWS_ENDPOINT_URL_S3/AWS_ENDPOINT_URL or
the profile's endpoint_url, else AWS) from the standard AWS configuration; retries bounded by the
retry budget (MACE_S3_RETRY_SECONDS, ``mace_ray.storage.s3_retry``). Addressing:
MACE_S3_ADDRESSING_STYLE=path|virtual|auto wins when set; otherwise path-style for any endpoint that
is not AWS (MinIO, SeaweedFS and most on-premise servers serve only that, and bucket-named hosts do
not resolve for 127.0.0.1 or a cluster service name), botocore's default for AWS.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import boto3
import botocore.session
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ProfileNotFound

from mace_ray.storage.base import StorageError, check_key
from mace_ray.storage.s3_retry import BoundedRetries

# AWS bucket naming rules (3-63 chars, lowercase letters, digits, dots, hyphens).
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_AWS_HOST = re.compile(r"(^|\.)amazonaws\.com(\.cn)?$|(^|\.)api\.aws$")
# How long one S3 request may keep failing or stalling before it gives up (MACE_S3_RETRY_SECONDS).
RETRY_SECONDS = 120.0


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
    bucket, _, prefix = url[5:].partition("/")
    if not bucket:
        raise StorageError(f"S3 URL {url!r} has no bucket (expected s3://bucket/prefix)")
    if "@" in bucket:  # s3://key:secret@bucket/x: echoing the URL would print the secret
        shown = f"s3://{bucket.rpartition('@')[2]}/{prefix}"
        raise StorageError(
            f"S3 URL {shown!r} with credentials before the bucket: they do not go in the URL "
            "(set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)"
        )
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise StorageError(
            f"S3 URL {url!r}: {bucket!r} is not a valid bucket name "
            "(3-63 lowercase letters, digits, '.' or '-')"
        )
    prefix = prefix.strip("/")
    try:
        return S3Location(bucket, prefix and check_key(prefix))
    except StorageError:
        raise StorageError(f"S3 URL {url!r}: invalid prefix {prefix!r} (empty, '.' or '..' parts)") from None


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


def retry_budget() -> float:
    raw = os.environ.get("MACE_S3_RETRY_SECONDS", "")
    if not raw:
        return RETRY_SECONDS
    try:
        value = float(raw)
    except ValueError:
        raise StorageError(f"MACE_S3_RETRY_SECONDS={raw!r}: expected a number of seconds") from None
    if not value >= 1:  # it sets the timeouts too (s3_retry.timeouts): below a second, nothing works
        raise StorageError(f"MACE_S3_RETRY_SECONDS={raw!r}: expected at least 1 second")
    return value


@functools.cache
def _loader() -> Any:
    return botocore.session.get_session().get_component("data_loader")


def make_client(
    url: str, s3_endpoint: str | None, style: str | None, pool: int, retries: BoundedRetries | None = None
) -> Any:
    """A boto3 S3 client from the standard AWS configuration; errors name ``url``.

    ``retries`` sets its timeouts and bounds its retries (default: the run's budget, from
    MACE_S3_RETRY_SECONDS); the preflight probe and the lease pass shorter ones.
    """
    retries = retries or BoundedRetries(retry_budget())

    def build(addressing: str) -> Any:
        config = Config(
            **retries.config(),
            max_pool_connections=pool,
            s3={"addressing_style": addressing},
            user_agent_extra="mace-ray",
        )
        # A session of its own (credentials and profile as the environment says now), with
        # the shared loader of botocore's model files: that halves the time to build a client.
        session = botocore.session.Session()
        session.register_component("data_loader", _loader())
        client = boto3.session.Session(botocore_session=session).client(
            "s3", endpoint_url=s3_endpoint or None, config=config
        )
        retries.install(client)
        return client

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
    # botocore builds a client for any scheme (ftp://host) and fails only at its first request,
    # with an EndpointResolutionError that would read as a bug: refuse it here, as input.
    endpoint = client.meta.endpoint_url
    if urlsplit(endpoint).scheme.lower() not in ("http", "https"):
        raise StorageError(
            f"{url}: S3 endpoint {safe_endpoint(endpoint)!r} is not a valid URL (expected http(s)://host:port)"
        )
    return client
