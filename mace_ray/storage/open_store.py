"""The store behind an output URL (a local folder or an S3 prefix), and the store a request or
a worker's spec names (its ``output`` and ``s3_endpoint``), opened the one way every driver and
worker opens it: for a spec that carries its driver's lease (``lease``, a ``LeaseRef``), with
every write checked against that lease (``mace_ray.storage.lease_guard``)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from mace_ray.storage.base import Storage, StorageError
from mace_ray.storage.lease_guard import lease_guarded
from mace_ray.storage.local import LocalStorage


def open_storage(url: str, s3_endpoint: str | None = None, must_exist: bool = False) -> Storage:
    """The storage backend for ``url``: a local folder, or ``s3://bucket/prefix``.

    ``s3_endpoint`` (the ``--s3-endpoint`` flag) overrides AWS_ENDPOINT_URL for S3 URLs and
    is ignored for local folders. ``must_exist``: a local folder that is only read (status)
    must be there already.
    """
    _named(url)
    if url[:5].lower() == "s3://":
        # boto3 is imported only by runs that write to S3.
        from mace_ray.storage.s3 import S3Storage

        return S3Storage(url, s3_endpoint=s3_endpoint)
    if "://" in url:
        raise StorageError(f"output {url!r}: unsupported scheme (use a local folder or s3://bucket/prefix)")
    return LocalStorage(url, must_exist=must_exist)


def absolute_output(output: str) -> str:
    """A local output folder as an absolute path (workers may run in another working
    directory); URLs unchanged."""
    _named(output)
    return output if "://" in output else str(Path(output).expanduser().resolve())


def _named(output: str) -> None:
    """An empty output (an unset "$OUT") would be the working folder: refused, not filled."""
    if not output.strip():
        raise StorageError(f"output {output!r} is empty: give a folder or s3://bucket/prefix")
    # s3:/bucket/x or s3:bucket/x is a mistyped URL: as a folder it would be filled silently
    # (./s3:/bucket/x) while the user looks for the run in the bucket.
    if output[:3].lower() == "s3:" and output[:5].lower() != "s3://":
        raise StorageError(
            f"output {output!r} is a mistyped S3 URL: write s3://bucket/prefix "
            f"(or ./{output} for a local folder)"
        )


class NamesOutput(Protocol):
    """A request (AuditRequest, EvalRequest) or a worker's spec (RunSpec, AuditSpec, EvalSpec)."""

    @property
    def output(self) -> str: ...
    @property
    def s3_endpoint(self) -> str | None: ...


def open_output(target: NamesOutput) -> Storage:
    storage = open_storage(target.output, s3_endpoint=target.s3_endpoint)
    lease = getattr(target, "lease", None)  # a RunSpec's; eval and audit hold no lease
    return storage if lease is None else lease_guarded(storage, lease)
