"""The storage a request or a worker's spec names: its ``output`` (a folder or
s3://bucket/prefix) and ``s3_endpoint``, opened the one way every driver and worker opens it."""

from __future__ import annotations

from typing import Protocol

from mace_ray.storage import Storage
from mace_ray.stores import open_storage


class NamesOutput(Protocol):
    """A request (AuditRequest, EvalRequest) or a worker's spec (RunSpec, AuditSpec, EvalSpec)."""

    @property
    def output(self) -> str: ...
    @property
    def s3_endpoint(self) -> str | None: ...


def open_output(target: NamesOutput) -> Storage:
    return open_storage(target.output, s3_endpoint=target.s3_endpoint)
