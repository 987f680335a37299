"""A worker's side of the run lock (``mace_ray.storage.lease``): every write of a worker is
checked against its driver's lease, which it knows by a ``LeaseRef`` in its spec (the lease's
key and the driver's owner token). ``open_output`` guards a worker's storage this way."""

from __future__ import annotations

import time

from mace_ray.storage.base import Storage
from mace_ray.storage.lease import LeaseRef, RunLocked, holder, read_lease


class LeaseGuard:
    """A worker's check before each write (``Storage.guarded``): RunLocked, in one line, unless
    the lease is still its driver's (the owner token) and was renewed within ``usable_s``.
    The lease is read again when the last read is over ``recheck_s`` old, or would refuse:
    a burst of writes costs one small read a second. Picklable (a worker's storage may be)."""

    def __init__(self, reader: Storage, ref: LeaseRef, recheck_s: float = 1.0) -> None:
        self.reader = reader
        self.ref = ref
        self.recheck_s = recheck_s
        self._heartbeat: float | None = None  # of the lease as last read
        self._read_at = 0.0

    @property
    def where(self) -> str:
        return f"{self.reader.url}/{self.ref.key}"

    def _read(self) -> None:
        lease = read_lease(self.reader, self.ref.key)[0]
        self._heartbeat = None
        if lease is None:
            raise RunLocked(
                f"run lock {self.where} is gone (released or removed): this run's driver no longer "
                "holds it; stopping before the next write"
            )
        if lease.get("owner") != self.ref.owner:
            raise RunLocked(
                f"run lock {self.where} was taken over by {holder(lease)}; stopping so as not to "
                "write over its run"
            )
        self._heartbeat, self._read_at = float(lease["heartbeat"]), time.monotonic()

    def __call__(self) -> None:
        if self._heartbeat is None or time.monotonic() - self._read_at > self.recheck_s:
            self._read()
        assert self._heartbeat is not None
        if time.time() - self._heartbeat > self.ref.usable_s:
            self._read()  # renewed since the last read?
            assert self._heartbeat is not None
            age = time.time() - self._heartbeat
            if age > self.ref.usable_s:
                self._heartbeat = None
                raise RunLocked(
                    f"run lock {self.where} was last renewed {age:.1f}s ago (writes stop after "
                    f"{self.ref.usable_s:g}s): its driver may have lost it; stopping before the next write"
                )


def lease_guarded(storage: Storage, ref: LeaseRef) -> Storage:
    """``storage`` with every write checked against the driver's lease (``LeaseGuard``)."""
    return storage.guarded(LeaseGuard(storage.bounded(ref.budget_s), ref))
