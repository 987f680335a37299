"""A run lock: a lease object in the run's own storage, so two drivers never run one run at once.

Why a lease, not a lock file or flock: the output may be S3, which has no locks, and a driver
that dies (OOM, SIGKILL, a lost node) must not block its run forever. The lease is one small
JSON object (owner, host, pid, started, heartbeat, ttl_s) at ``key``, written only with the
storage's conditional operations (see ``Storage.create_exclusive`` and friends):

- acquire: ``create_exclusive``; if the lease exists and its heartbeat is younger than its
  ``ttl_s``, the run is held (wait or refuse). Otherwise the lease is stale and is replaced
  with ``replace_if`` on the version seen: of contenders that saw the same stale lease exactly
  one succeeds, the others see the winner's fresh lease on their next look.
- heartbeat: a daemon thread rewrites the lease every ``heartbeat_s`` with ``replace_if`` on
  the version it last wrote. If that fails because another owner replaced the lease, the lock
  is ``lost``: the driver must stop instead of writing (``check()`` raises).
- release: ``delete_if`` on the version last written, so another owner's lease is never removed.

Clock assumption: staleness compares the heartbeat time the holder wrote (its wall clock) with
the reader's wall clock, so the drivers' clocks must agree to well within ``ttl_s -
heartbeat_s`` (100 s with the defaults; NTP keeps them within milliseconds). A reader whose
clock runs ahead by more than that would take over a live lease; the holder then finds it
``lost`` at its next heartbeat. A holder frozen for longer than ``ttl_s`` (suspended VM, swap
storm) can write between waking up and that heartbeat: a lease narrows, but cannot close,
that window, so drivers call ``check()`` right before each commit point.

A request whose response was lost and was retried can fail its precondition although its first
attempt succeeded; the lock therefore re-reads the lease after every conditional write and
trusts only the owner it finds there. The owner id identifies the holder: two RunLocks given
the same ``owner`` are the same holder.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from types import TracebackType
from typing import Any

from mace_core.errors import MaceError
from mace_ray.storage.base import Storage

log = logging.getLogger("mace_ray")


class RunLocked(MaceError):
    """The run is locked by another driver, or this driver's lease was taken over."""


def _one_line(value: Any, limit: int = 80) -> str:
    """A lease field fit for a one-line message, whatever the object holds."""
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[:limit] + "..."


def _secs(s: float) -> str:
    return f"{s:.1f}s" if s < 10 else f"{s:.0f}s"


def _parse(raw: bytes) -> dict[str, Any] | None:
    """A lease as written by RunLock, or None for anything else (treated as stale)."""
    try:
        lease = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(lease, dict):
        return None
    for field in ("heartbeat", "ttl_s"):
        if isinstance(lease.get(field), bool) or not isinstance(lease.get(field), int | float):
            return None
    return lease


def _gone(lease: dict[str, Any]) -> bool:
    """Whether the holder ran on this host and its process no longer exists (killed, OOM):
    then its lease is stale at once, and a rerun on the same machine need not wait ``ttl_s``."""
    pid = lease.get("pid")
    if lease.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except OSError:  # exists, owned by another user
        return False
    return False


def lease_is_live(raw: bytes) -> bool:
    """Whether a stored lease is held now: readable, renewed within its ttl, and (on this
    host) its process alive. What ``RunLock`` would refuse to take over."""
    lease = _parse(raw)
    if lease is None:
        return False
    return time.time() - lease["heartbeat"] <= lease["ttl_s"] and not _gone(lease)


class RunLock:
    """A lease on ``key`` in ``storage``; see the module docstring for the protocol.

    ``ttl_s``: how long the lease survives without a heartbeat (how long a crashed driver
    blocks its run). ``heartbeat_s``: how often it is renewed; well below ``ttl_s`` so that a
    slow storage request or two do not let it expire. ``owner``: a unique id (default: a new
    uuid); reusing a crashed driver's id lets it reclaim its own lease at once.
    """

    def __init__(
        self,
        storage: Storage,
        key: str,
        *,
        ttl_s: float = 120.0,
        heartbeat_s: float = 20.0,
        owner: str | None = None,
    ) -> None:
        if not 0 < heartbeat_s < ttl_s:
            raise MaceError(f"run lock: heartbeat_s={heartbeat_s} must be above 0 and below ttl_s={ttl_s}")
        self.storage = storage
        self.key = key
        self.ttl_s = float(ttl_s)
        self.heartbeat_s = float(heartbeat_s)
        self.owner = owner or uuid.uuid4().hex
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self._started = ""
        self._version: str | None = None  # the lease's version as we last saw it ours; None: not held
        self._renewed = 0.0  # monotonic time before the last write that is known to have kept it ours
        self._lost: str | None = None  # why the lease is no longer ours (another owner replaced it)
        self._mutex = threading.Lock()  # one heartbeat or release at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def where(self) -> str:
        return f"{self.storage.url}/{self.key}"

    @property
    def held(self) -> bool:
        """Acquired and not yet released (it may still have been lost meanwhile)."""
        return self._version is not None

    @property
    def lost(self) -> bool:
        """True if another owner has replaced the lease, or it went unrenewed for ``ttl_s``
        (another driver may have taken it over by now): stop instead of writing."""
        return self._lost is not None or (self.held and time.monotonic() - self._renewed > self.ttl_s)

    def check(self) -> None:
        """Raise RunLocked unless the lease is held and still ours; call before each commit."""
        if self._lost is not None:
            raise RunLocked(self._lost)
        if not self.held:
            raise RunLocked(f"run lock {self.where} is not held by this driver")
        silent = time.monotonic() - self._renewed
        if silent > self.ttl_s:
            raise RunLocked(
                f"run lock {self.where} was not renewed for {_secs(silent)} (ttl {_secs(self.ttl_s)}): "
                "another driver may have taken it over; stopping"
            )

    # --- acquire ----------------------------------------------------------------------

    def acquire(self, wait_s: float = 0.0) -> None:
        """Take the lease, waiting up to ``wait_s`` seconds for a live holder to release it
        (or to go stale); RunLocked naming the holder when it is still held after that."""
        if self.held:
            raise MaceError(f"run lock {self.where} is already held by this RunLock")
        self._lost = None
        self._started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        deadline = time.monotonic() + max(0.0, wait_s)
        poll = min(1.0, self.heartbeat_s / 2)
        waiting = False
        while True:
            holder = self._try_acquire()
            if holder is None:
                self._start_heartbeat()
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise RunLocked(self._held_message(holder))
            if not waiting:
                log.info("%s; waiting up to %s", self._held_message(holder), _secs(left))
                waiting = True
            time.sleep(min(poll, left))

    def _try_acquire(self) -> dict[str, Any] | None:
        """One attempt: None once the lease is ours, else the live holder's lease."""
        while True:
            self._renewed = time.monotonic()
            created = self.storage.create_exclusive(self.key, self._lease_bytes())
            current = self.storage.read_versioned(self.key)
            if current is None:
                continue  # released between our create and our read: try again
            raw, version = current
            lease = _parse(raw)
            if lease is not None and lease.get("owner") == self.owner:
                # Ours: just created, taken over, or created by a retried request.
                self._version = version
                return None
            if created:
                continue  # replaced already (a contender's clock far ahead): look again
            age = time.time() - lease["heartbeat"] if lease is not None else float("inf")
            if lease is not None and age <= lease["ttl_s"] and not _gone(lease):
                return lease
            self._renewed = time.monotonic()
            if self.storage.replace_if(self.key, self._lease_bytes(), version):
                if lease is None:
                    log.warning("run lock %s: replacing an unreadable lease", self.where)
                else:
                    log.warning(
                        "run lock %s: taking over a stale lease of host %s pid %s "
                        "(last heartbeat %s ago, ttl %s)",
                        self.where,
                        _one_line(lease.get("host", "?")),
                        _one_line(lease.get("pid", "?")),
                        _secs(age),
                        _secs(float(lease["ttl_s"])),
                    )
            # Whoever won (us, another contender, or the holder's own heartbeat): look again.

    def _lease_bytes(self) -> bytes:
        lease = {
            "owner": self.owner,
            "host": self.host,
            "pid": self.pid,
            "started": self._started,
            "heartbeat": time.time(),
            "ttl_s": self.ttl_s,
        }
        return json.dumps(lease, sort_keys=True).encode()

    def _held_message(self, lease: dict[str, Any]) -> str:
        age = max(0.0, time.time() - lease["heartbeat"])
        return (
            f"run lock {self.where} is held by another driver: host {_one_line(lease.get('host', '?'))} "
            f"pid {_one_line(lease.get('pid', '?'))}, started {_one_line(lease.get('started', '?'))}, "
            f"last heartbeat {_secs(age)} ago; the lock expires after {_secs(float(lease['ttl_s']))} "
            "without a heartbeat"
        )

    # --- heartbeat --------------------------------------------------------------------

    def _start_heartbeat(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mace-runlock-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        stop = self._stop
        while not stop.wait(self.heartbeat_s):
            if not self._beat():
                return

    def _beat(self) -> bool:
        """Renew the lease; False when there is nothing more to renew (released or lost)."""
        with self._mutex:
            if self._version is None or self._lost is not None:
                return False
            started = time.monotonic()
            data = self._lease_bytes()
            try:
                self.storage.replace_if(self.key, data, self._version)
                current = self.storage.read_versioned(self.key)
            except Exception as e:  # storage trouble: keep trying; `lost` turns true after ttl_s
                log.warning("run lock %s: heartbeat failed (%s); retrying", self.where, _one_line(e, 200))
                return True
            lease = _parse(current[0]) if current is not None else None
            if lease is not None and lease.get("owner") == self.owner:
                assert current is not None
                self._version = current[1]
                if current[0] == data:
                    self._renewed = started
                return True
            if lease is None:
                self._lost = f"run lock {self.where} was removed or overwritten by another writer; stopping"
            else:
                self._lost = (
                    f"run lock {self.where} was taken over by host {_one_line(lease.get('host', '?'))} "
                    f"pid {_one_line(lease.get('pid', '?'))}; stopping so as not to write over its run"
                )
            log.warning("%s", self._lost)
            return False

    # --- release ----------------------------------------------------------------------

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still ours. Never raises: a lease
        left behind by a storage failure expires after ``ttl_s``."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        with self._mutex:
            version, self._version = self._version, None
            if version is None or self._lost is not None:
                return
            try:
                if self.storage.delete_if(self.key, version):
                    return
                # Not deleted: a heartbeat whose response was lost may have changed the
                # version while keeping it ours; delete that one, never another owner's.
                current = self.storage.read_versioned(self.key)
                lease = _parse(current[0]) if current is not None else None
                if current is not None and lease is not None and lease.get("owner") == self.owner:
                    self.storage.delete_if(self.key, current[1])
                elif current is not None:
                    log.warning("run lock %s: no longer ours at release, left in place", self.where)
            except Exception as e:
                log.warning(
                    "run lock %s: release failed (%s); it expires after %s",
                    self.where,
                    _one_line(e, 200),
                    _secs(self.ttl_s),
                )

    def __enter__(self) -> RunLock:
        """``with RunLock(...)`` acquires without waiting (call ``acquire(wait_s)`` first to wait)."""
        if not self.held:
            self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
