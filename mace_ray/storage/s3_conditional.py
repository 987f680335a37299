"""Conditional writes on S3 (``S3Storage.create_exclusive``, ``replace_if``, ``delete_if``): the
compare-and-swap the run lock's lease is built on (``mace_ray.storage.lease``).

S3 conditional writes: PutObject with If-None-Match: * (AWS since 08/2024) or If-Match: <etag>
(AWS since 11/2024); the server decides atomically, so of two racing requests exactly one
succeeds and the other gets 412 PreconditionFailed. Verified on SeaweedFS 4.48 (12 racing
clients, one winner in each of 80 rounds) and required of the server: one that ignores these
headers would make every conditional write unconditional. A request retried after a lost
response can fail its precondition because its first attempt succeeded: False then means
"not done by this attempt"; callers that must know re-read the object (RunLock compares the
owner).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from mace_ray.storage.s3_retry import error_code, http_status

if TYPE_CHECKING:
    from mace_ray.storage.s3 import S3Storage


def conditional(self: S3Storage, key: str, request: Callable[[], Any]) -> bool:
    """``request()`` under a precondition: True when applied, False when the precondition
    failed (412, or 404 for an object that is gone). 409 ConditionalRequestConflict (AWS:
    a concurrent operation on the key won the race) is retried by the client, as AWS advises."""

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


def create_exclusive(self: S3Storage, key: str, data: bytes) -> bool:
    """Write ``key`` only if no object has that name (If-None-Match: *); False if one does."""
    full = self.writable_key(key)
    return conditional(
        self, key, lambda: self.client.put_object(Bucket=self.bucket, Key=full, Body=data, IfNoneMatch="*")
    )


def replace_if(self: S3Storage, key: str, data: bytes, version: str) -> bool:
    """Replace ``key`` only if its ETag is still ``version`` (If-Match)."""
    full = self.writable_key(key)
    return conditional(
        self, key, lambda: self.client.put_object(Bucket=self.bucket, Key=full, Body=data, IfMatch=version)
    )


def delete_if(self: S3Storage, key: str, version: str) -> bool:
    """Delete ``key`` only if its ETag is still ``version``.

    DeleteObject with If-Match is honoured by SeaweedFS 4.48 and by AWS, but older
    S3-compatible servers ignore the header and delete unconditionally; so the ETag is
    compared first (HEAD) as well: on such a server a replace that lands between the
    HEAD and the DELETE is the only case in which another writer's object is removed.
    """
    full = self.writable_key(key)

    def head() -> str | None:
        try:
            return str(self.client.head_object(Bucket=self.bucket, Key=full)["ETag"])
        except ClientError as e:
            if http_status(e) == 404 and error_code(e) != "NoSuchBucket":
                return None
            raise

    if self.request(self.uri(key), head) != version:
        return False
    return conditional(
        self, key, lambda: self.client.delete_object(Bucket=self.bucket, Key=full, IfMatch=version)
    )
