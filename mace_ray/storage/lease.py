"""A run lock: a lease object in the run's own storage, so two drivers never run one run at once.

Why a lease: the output may be S3, which has no locks, and a driver that dies (OOM, SIGKILL, a
lost node) must not block its run forever. The lease is one small JSON object (owner, host, pid,
pid namespace, started, heartbeat, ttl_s) at ``key``, written only with the storage's
conditional operations (``Storage.create_exclusive`` and friends):

- acquire: ``create_exclusive``; a lease whose heartbeat is younger than its ``ttl_s`` is held
  (wait or refuse); a stale one is replaced with ``replace_if`` on the version seen, so of
  contenders that saw the same stale lease exactly one succeeds. A holder on this host whose
  process is gone is stale at once, but only in this process's pid namespace (containers may
  share a host name, not pids); a lease without one waits ``ttl_s``.
- heartbeat: a daemon thread rewrites the lease every ``heartbeat_s`` (``replace_if`` on the
  version it last wrote) through a client whose requests end within ``usable_s / 6`` (a renewal
  of two requests cannot outlast a third of the lease's usable life); a failed renewal is tried
  again at the next beat. If another owner replaced the lease, the lock is ``lost`` at once.
- writes: the holder writes only while its last confirmed renewal is younger than ``usable_s =
  ttl_s - margin_s`` (45 s of a 60 s lease): a run's storage is ``guarded`` by ``check()``, its
  workers' by ``mace_ray.storage.lease_guard`` (a ``LeaseRef``: the key and the owner token), so
  every write of the run is refused once the lease is lost or unrenewed; the margin leaves a
  write under way time to land before another driver can take over (after ``ttl_s`` of silence).
- release: ``delete_if`` on the version last written (never another owner's lease), with short
  requests, not waiting for a renewal in flight: it ends within seconds.

Clocks: staleness compares the heartbeat the holder wrote (its wall clock) with the reader's, so
drivers' clocks must agree to well within ``margin_s`` (15 s by default; NTP keeps them within
milliseconds). A write that takes longer than the margin to land (a stalled upload) can still
land after a takeover: the lease narrows that window to the margin; S3 offers no fencing.

A request retried after a lost response can fail its precondition although its first attempt
succeeded, so the lock re-reads the lease after every conditional write and trusts only the owner
it finds there. Two RunLocks given the same ``owner`` are the same holder.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from mace_core.errors import MaceError
from mace_ray.storage.base import Storage

log = logging.getLogger("mace_ray")

# Release: each request within this; all of it within 2 s (a SIGTERM handler has Ray's 3 s).
RELEASE_S = 0.5


class RunLocked(MaceError):
    """The run is locked by another driver, or this driver's lease was taken over."""


def _one_line(value: Any, limit: int = 80) -> str:
    """A lease field fit for a one-line message, whatever the object holds."""
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[:limit] + "..."


def _secs(s: float) -> str:
    return f"{s:.1f}s" if s < 10 else f"{s:.0f}s"


def parse_lease(raw: bytes | None) -> dict[str, Any] | None:
    """A lease as written by RunLock, or None for anything else (treated as stale) or nothing."""
    try:
        lease = json.loads(raw) if raw is not None else None
    except (ValueError, UnicodeDecodeError):
        return None
    times = [lease.get(field) for field in ("heartbeat", "ttl_s")] if isinstance(lease, dict) else [None]
    return lease if all(isinstance(t, int | float) and not isinstance(t, bool) for t in times) else None


def read_lease(storage: Storage, key: str) -> tuple[dict[str, Any] | None, tuple[bytes, str] | None]:
    """The lease at ``key`` (``parse_lease``) and what was read: ``(data, version)`` or None."""
    current = storage.read_versioned(key)
    return parse_lease(current[0] if current is not None else None), current


def pid_namespace() -> int | None:
    """This process's pid namespace (the inode of /proc/self/ns/pid), None where unknown."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def _gone(lease: dict[str, Any]) -> bool:
    """Whether the holder ran on this host, in this pid namespace, and its process no longer
    exists (killed, OOM): then its lease is stale at once, and a rerun on the same machine need
    not wait ``ttl_s``. Containers sharing a host name but not pids, or a lease that does not
    say its namespace, are not "this host"."""
    pid, ns = lease.get("pid"), lease.get("pidns")
    if (
        lease.get("host") != socket.gethostname()
        or not isinstance(pid, int)
        or pid <= 0
        or pid == os.getpid()
    ):
        return False
    if ns is None or ns != pid_namespace():
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except OSError:  # exists, owned by another user
        return False
    return False


def _live(lease: dict[str, Any] | None) -> bool:
    return lease is not None and time.time() - lease["heartbeat"] <= lease["ttl_s"] and not _gone(lease)


def lease_is_live(raw: bytes) -> bool:
    """Whether a stored lease is held now: readable, renewed within its ttl, and (on this
    host) its process alive. What ``RunLock`` would refuse to take over."""
    return _live(parse_lease(raw))


def holder(lease: dict[str, Any]) -> str:
    return f"host {_one_line(lease.get('host', '?'))} pid {_one_line(lease.get('pid', '?'))}"


@dataclass(frozen=True)
class LeaseRef:
    """A driver's lease as its workers check it before each write (``LeaseGuard``): where it
    is, the driver's owner token, how long after a heartbeat it may be written under, and the
    budget of the request that reads it. Small and picklable: it travels in a worker's spec."""

    key: str
    owner: str
    usable_s: float
    budget_s: float


class RunLock:
    """A lease on ``key`` in ``storage``; see the module docstring for the protocol.

    ``ttl_s``: how long the lease survives without a heartbeat (how long a crashed driver
    blocks its run). ``heartbeat_s``: how often it is renewed. ``margin_s`` (default a quarter
    of ``ttl_s``): the holder stops writing this long before others may take the lease over.
    ``owner``: a unique id (default: a new uuid); reusing a crashed driver's id lets it reclaim
    its own lease at once.
    """

    def __init__(
        self,
        storage: Storage,
        key: str,
        *,
        ttl_s: float = 120.0,
        heartbeat_s: float = 20.0,
        margin_s: float | None = None,
        owner: str | None = None,
    ) -> None:
        margin = ttl_s / 4 if margin_s is None else margin_s
        if not 0 < heartbeat_s < ttl_s - margin or margin < 0:
            raise MaceError(
                f"run lock: heartbeat_s={heartbeat_s} must be above 0 and below ttl_s - margin_s "
                f"= {ttl_s - margin:g}"
            )
        self.storage, self.key, self.owner = storage, key, owner or uuid.uuid4().hex
        self.ttl_s, self.heartbeat_s, self.usable_s = float(ttl_s), float(heartbeat_s), float(ttl_s - margin)
        self.host, self.pid = socket.gethostname(), os.getpid()
        # Renewals through requests that end within a sixth of the usable life (two per
        # renewal: a third); release through shorter ones still.
        self.renew_budget_s = self.usable_s / 6
        self._renewer = self._releaser = storage  # their bounded clients: made once acquired
        self._started = ""
        self._version: str | None = None  # the lease's version as we last saw it ours; None: not held
        self._renewed = 0.0  # monotonic time before the last write that is known to have kept it ours
        self._lost: str | None = None  # why the lease is no longer ours (taken over, or unrenewed)
        self._mutex = threading.Lock()  # guards the fields above; never held across a request
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def where(self) -> str:
        return f"{self.storage.url}/{self.key}"

    def _mine(self, lease: dict[str, Any] | None) -> bool:
        return lease is not None and lease.get("owner") == self.owner

    @property
    def ref(self) -> LeaseRef:
        """What a worker needs to check this lease before its writes."""
        return LeaseRef(self.key, self.owner, self.usable_s, self.renew_budget_s)

    @property
    def held(self) -> bool:
        """Acquired and not yet released (it may still have been lost meanwhile)."""
        return self._version is not None

    @property
    def lost(self) -> bool:
        """True if another owner has replaced the lease, or its last confirmed renewal is older
        than ``usable_s`` (another driver may take it over soon): stop instead of writing."""
        return self._lost is not None or (self.held and time.monotonic() - self._renewed > self.usable_s)

    def check(self) -> None:
        """Raise RunLocked (one line) unless the lease is held, still ours, and renewed within
        ``usable_s``. Called before every write of the run (``Storage.guarded``); in memory,
        no request, except once when it first finds the lease expired (to name a new holder)."""
        if self._lost is not None:
            raise RunLocked(self._lost)
        if not self.held:
            raise RunLocked(
                f"run lock {self.where} is not held by this driver; stopping before the next write"
            )
        silent = time.monotonic() - self._renewed
        if silent > self.usable_s:
            message = (
                f"run lock {self.where} was not renewed for {_secs(silent)} (writes stop after "
                f"{_secs(self.usable_s)}, another driver may take it over after {_secs(self.ttl_s)})"
            )
            try:
                lease = read_lease(self._releaser, self.key)[0]
            except Exception:  # storage unreachable: what the lease says cannot be known
                lease = None
            if lease is not None and not self._mine(lease):
                message += f"; it is now held by {holder(lease)}"
            with self._mutex:
                self._lost = f"{message}; stopping before the next write"
            raise RunLocked(self._lost)

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
            live = self._try_acquire()
            if live is None:
                self._start_heartbeat()
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise RunLocked(self._held_message(live))
            if not waiting:
                log.info("%s; waiting up to %s", self._held_message(live), _secs(left))
                waiting = True
            time.sleep(min(poll, left))

    def _try_acquire(self) -> dict[str, Any] | None:
        """One attempt: None once the lease is ours, else the live holder's lease."""
        while True:
            self._renewed = time.monotonic()
            created = self.storage.create_exclusive(self.key, self._lease_bytes())
            lease, current = read_lease(self.storage, self.key)
            if current is None:
                continue  # released between our create and our read: try again
            if self._mine(lease):  # just created, taken over, or created by a retried request
                self._version = current[1]
                return None
            if created:
                continue  # replaced already (a contender's clock far ahead): look again
            if _live(lease):
                return lease
            self._renewed = time.monotonic()
            if self.storage.replace_if(self.key, self._lease_bytes(), current[1]):
                if lease is None:
                    log.warning("run lock %s: replacing an unreadable lease", self.where)
                else:
                    age, ttl = time.time() - lease["heartbeat"], float(lease["ttl_s"])
                    log.warning(
                        "run lock %s: taking over a stale lease of %s (last heartbeat %s ago, ttl %s)",
                        self.where,
                        holder(lease),
                        _secs(age),
                        _secs(ttl),
                    )
            # Whoever won (us, another contender, or the holder's own heartbeat): look again.

    def _lease_bytes(self) -> bytes:
        lease = {"owner": self.owner, "host": self.host, "pid": self.pid, "pidns": pid_namespace()}
        lease |= {"started": self._started, "heartbeat": time.time(), "ttl_s": self.ttl_s}
        return json.dumps(lease, sort_keys=True).encode()

    def _held_message(self, lease: dict[str, Any]) -> str:
        age = max(0.0, time.time() - lease["heartbeat"])
        return (
            f"run lock {self.where} is held by another driver: {holder(lease)}, "
            f"started {_one_line(lease.get('started', '?'))}, "
            f"last heartbeat {_secs(age)} ago; the lock expires after {_secs(float(lease['ttl_s']))} "
            "without a heartbeat"
        )

    # --- heartbeat --------------------------------------------------------------------

    def _start_heartbeat(self) -> None:
        if self._renewer is self.storage:  # built here, not at release time (SIGTERM's seconds)
            self._renewer = self.storage.bounded(self.renew_budget_s)
            self._releaser = self.storage.bounded(min(RELEASE_S, self.renew_budget_s))
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
            version = self._version
            if version is None or self._lost is not None:
                return False
        started = time.monotonic()
        data = self._lease_bytes()
        try:
            self._renewer.replace_if(self.key, data, version)
            lease, current = read_lease(self._renewer, self.key)
        except Exception as e:  # storage trouble: tried again at the next beat
            left = self.usable_s - (time.monotonic() - self._renewed)
            log.warning(
                "run lock %s: renewal failed (%s); trying again in %s, writes stop in %s",
                self.where,
                _one_line(e, 200),
                _secs(self.heartbeat_s),
                _secs(max(0.0, left)),
            )
            return True
        with self._mutex:
            if self._version is None or self._lost is not None:
                return False  # released (or found lost) while the renewal was under way
            if self._mine(lease) and current is not None:
                self._version = current[1]
                if current[0] == data:
                    self._renewed = started
                return True
            self._lose(lease)
        return False

    def _lose(self, lease: dict[str, Any] | None) -> None:
        """The lease is no longer ours (``lease``: what is there now); under ``_mutex``."""
        self._lost = f"run lock {self.where} " + (
            "was removed or overwritten by another writer; stopping before the next write"
            if lease is None
            else f"was taken over by {holder(lease)}; stopping so as not to write over its run"
        )
        log.warning("%s", self._lost)

    def verify(self) -> None:
        """Look at the lease now (one short request) instead of at the next beat: another
        owner's, or none, and the lock is lost. Storage trouble changes nothing."""
        if not self.held or self._lost is not None:
            return
        try:
            lease = read_lease(self._renewer, self.key)[0]
        except Exception:
            return
        with self._mutex:
            if self._version is not None and self._lost is None and not self._mine(lease):
                self._lose(lease)

    # --- release ----------------------------------------------------------------------

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still ours, within seconds (short
        requests; a renewal in flight is not waited for). Never raises: a lease left behind by
        a storage failure expires after ``ttl_s``."""
        self._stop.set()
        self._thread = None
        with self._mutex:
            version, self._version = self._version, None
            lost = self._lost is not None
        if version is None or lost:
            return
        started = time.monotonic()
        try:  # one conditional delete (HEAD, DELETE If-Match: 2 x RELEASE_S at most)...
            if self._releaser.delete_if(self.key, version) or time.monotonic() - started > RELEASE_S:
                return
            # ...and when it was quick but found another version: a renewal (in flight, or whose
            # response was lost) may have changed it while keeping it ours; delete that one,
            # never another owner's (3 x RELEASE_S at most).
            lease, current = read_lease(self._releaser, self.key)
            if current is not None and self._mine(lease):
                self._releaser.delete_if(self.key, current[1])
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
