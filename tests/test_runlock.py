"""The run lock (mace_ray.storage.lease) and the conditional storage operations it is built on, on a
local folder and on a real S3 server (SeaweedFS, see s3server.py): no mocks.

Timings are small (ttl 2 s, heartbeat 0.2 s: writes stop 1.5 s after the last renewal, each
renewal request has 0.25 s) so that expiry and takeover happen within seconds; every wait
polls for the condition rather than sleeping a fixed time.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable

import pytest

from mace_core.errors import MaceError
from mace_ray.storage.base import Storage
from mace_ray.storage.lease import RunLock, RunLocked
from mace_ray.storage.local import LocalStorage

KEY = "run-1/LEASE"
TTL, BEAT = 2.0, 0.2


@pytest.fixture(params=["local", "s3"])
def open_store(request, tmp_path, monkeypatch) -> Callable[[], Storage]:
    """Opens the same location anew for each driver, as separate processes would."""
    if request.param == "local":
        return lambda: LocalStorage(tmp_path / "out")
    from mace_ray.storage.s3 import S3Storage

    server = request.getfixturevalue("s3_server")
    for k in list(os.environ):
        if k.startswith(("AWS_", "MACE_S3_")):
            monkeypatch.delenv(k)
    for k, v in server.env().items():
        monkeypatch.setenv(k, v)
    bucket = server.create_bucket(f"lock-{uuid.uuid4().hex[:12]}")
    # A budget that a loaded CI machine never exhausts: six threads contend at once here, and
    # what these tests check is who wins, not how long S3 may stall.
    return lambda: S3Storage(f"s3://{bucket}/runs", server.endpoint, retry_seconds=30)


def lease_of(storage: Storage) -> dict:
    current = storage.read_versioned(KEY)
    assert current is not None
    return json.loads(current[0])


def foreign_lease(
    age: float, ttl: float = TTL, host: str = "ghost-host", pid: int = 4242, pidns: int | None = None
) -> bytes:
    """A lease of another driver whose last heartbeat was ``age`` seconds ago."""
    lease = {
        "owner": uuid.uuid4().hex,
        "host": host,
        "pid": pid,
        "pidns": pidns,
        "started": "2020-01-01T00:00:00Z",
        "heartbeat": time.time() - age,
        "ttl_s": ttl,
    }
    return json.dumps(lease).encode()


def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_conditional_storage_operations(open_store):
    s = open_store()
    assert s.read_versioned(KEY) is None
    assert s.create_exclusive(KEY, b"one")
    assert not s.create_exclusive(KEY, b"two")
    data, v1 = s.read_versioned(KEY)
    assert data == b"one"
    assert not s.replace_if(KEY, b"x", v1 + "0")
    assert s.replace_if(KEY, b"three", v1)
    data, v2 = s.read_versioned(KEY)
    assert data == b"three" and v2 != v1
    assert not s.replace_if(KEY, b"x", v1)  # the old version no longer matches
    assert not s.delete_if(KEY, v1)
    assert s.read_bytes(KEY) == b"three"
    assert s.list("run-1") == [KEY]  # no temporaries or lock files listed
    assert s.delete_if(KEY, v2)
    assert s.read_versioned(KEY) is None
    assert not s.replace_if(KEY, b"x", v2)  # gone: nothing to replace
    assert not s.delete_if(KEY, v2)


def test_acquire_writes_the_lease_and_release_removes_it(open_store):
    s = open_store()
    lock = RunLock(s, KEY, ttl_s=TTL, heartbeat_s=BEAT)
    with lock:
        assert lock.held and not lock.lost
        lock.check()
        lease = lease_of(s)
        assert lease["owner"] == lock.owner and lease["ttl_s"] == TTL
        assert lease["host"] == socket.gethostname() and lease["pid"] == os.getpid()
        assert lease["pidns"] == os.stat("/proc/self/ns/pid").st_ino
        assert lease["started"].endswith("Z") and abs(lease["heartbeat"] - time.time()) < 5
    assert not lock.held
    assert s.read_versioned(KEY) is None
    with RunLock(open_store(), KEY, ttl_s=TTL, heartbeat_s=BEAT):  # free again
        pass


def test_a_second_driver_is_refused_in_one_line_naming_the_holder(open_store):
    s = open_store()
    with RunLock(s, KEY, ttl_s=60, heartbeat_s=10):
        before = s.read_versioned(KEY)
        other = RunLock(open_store(), KEY, ttl_s=60, heartbeat_s=10)
        with pytest.raises(RunLocked) as err:
            other.acquire()
        msg = str(err.value)
        assert "\n" not in msg
        assert KEY in msg and socket.gethostname() in msg and f"pid {os.getpid()}" in msg
        assert "started 20" in msg and "last heartbeat" in msg and "expires after 60s" in msg
        assert not other.held
        assert s.read_versioned(KEY) == before  # the refused driver changed nothing


def test_wait_succeeds_once_the_holder_releases_and_times_out_otherwise(open_store):
    first = RunLock(open_store(), KEY, ttl_s=60, heartbeat_s=10)
    first.acquire()
    second = RunLock(open_store(), KEY, ttl_s=60, heartbeat_s=10)
    t0 = time.monotonic()
    with pytest.raises(RunLocked):
        second.acquire(wait_s=0.3)
    assert 0.3 <= time.monotonic() - t0 < 3
    releaser = threading.Timer(0.3, first.release)
    releaser.start()
    t0 = time.monotonic()
    second.acquire(wait_s=10)
    waited = time.monotonic() - t0
    releaser.join()
    assert 0.25 <= waited < 5
    assert lease_of(second.storage)["owner"] == second.owner
    second.release()


def test_a_stale_lease_is_taken_over_with_a_warning(open_store, caplog):
    s = open_store()
    s.write_bytes(KEY, foreign_lease(age=10.0))
    lock = RunLock(s, KEY, ttl_s=TTL, heartbeat_s=BEAT)
    with caplog.at_level(logging.WARNING, logger="mace_ray"), lock:
        assert lease_of(s)["owner"] == lock.owner
    assert any("stale" in r.getMessage() and "ghost-host" in r.getMessage() for r in caplog.records)


def test_staleness_uses_the_holders_ttl(open_store):
    s = open_store()
    s.write_bytes(KEY, foreign_lease(age=10.0, ttl=60.0))  # silent 10 s, but promised 60 s
    with pytest.raises(RunLocked, match="ghost-host pid 4242"):
        RunLock(s, KEY, ttl_s=TTL, heartbeat_s=BEAT).acquire()


def test_a_dead_holder_on_this_host_is_stale_at_once_only_in_this_pid_namespace(tmp_path):
    s = LocalStorage(tmp_path / "out")
    gone = subprocess.Popen(["true"])
    gone.wait()  # exited and reaped: its pid names no process
    dead_pid = gone.pid
    ns = os.stat("/proc/self/ns/pid").st_ino
    here = socket.gethostname()
    # Same host, same pid namespace, its process gone: taken over at once, not after 60 s.
    s.write_bytes(KEY, foreign_lease(age=0.0, ttl=60.0, host=here, pid=dead_pid, pidns=ns))
    with RunLock(s, KEY, ttl_s=60, heartbeat_s=10):
        pass
    # The same host name in another pid namespace (a container), or a lease that does not say:
    # that pid means nothing here, so the lease lives until its ttl.
    for other in (ns + 1, None):
        s.write_bytes(KEY, foreign_lease(age=0.0, ttl=60.0, host=here, pid=dead_pid, pidns=other))
        with pytest.raises(RunLocked, match=f"host {here} pid {dead_pid}"):
            RunLock(s, KEY, ttl_s=60, heartbeat_s=10).acquire()


def test_contenders_for_a_stale_lease_exactly_one_wins(open_store):
    n = 6
    stores = [open_store() for _ in range(n)]
    for _ in range(4):
        stores[0].write_bytes(KEY, foreign_lease(age=10.0))
        locks = [RunLock(s, KEY, ttl_s=30, heartbeat_s=10) for s in stores]
        barrier = threading.Barrier(n)
        outcome: dict[int, str] = {}

        def contend(i: int, locks: list[RunLock] = locks, barrier=barrier, outcome=outcome) -> None:
            barrier.wait()
            try:
                locks[i].acquire()
                outcome[i] = "won"
            except RunLocked:
                outcome[i] = "refused"

        threads = [threading.Thread(target=contend, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [i for i, o in outcome.items() if o == "won"]
        assert len(outcome) == n and len(winners) == 1, outcome
        assert lease_of(stores[0])["owner"] == locks[winners[0]].owner
        locks[winners[0]].release()


def test_the_heartbeat_keeps_the_lease_alive_past_its_ttl(open_store):
    s = open_store()
    with RunLock(s, KEY, ttl_s=TTL, heartbeat_s=BEAT) as lock:
        first = lease_of(s)["heartbeat"]
        time.sleep(1.5 * TTL)
        with pytest.raises(RunLocked):
            RunLock(open_store(), KEY, ttl_s=TTL, heartbeat_s=BEAT).acquire()
        assert lease_of(s)["heartbeat"] > first + TTL
        assert not lock.lost
        lock.check()


def test_a_frozen_driver_loses_its_lease_and_its_release_keeps_the_new_one(open_store, monkeypatch):
    s = open_store()
    frozen = RunLock(s, KEY, ttl_s=TTL, heartbeat_s=BEAT, margin_s=TTL / 2)  # 1 s to see it stop
    monkeypatch.setattr(frozen, "_beat", lambda: True)  # its heartbeats no longer happen
    frozen.acquire()
    wait_for(lambda: frozen.lost)  # unrenewed for usable_s: it must stop writing...
    stopped = time.time()
    assert stopped - lease_of(s)["heartbeat"] < TTL  # ...before another driver may take over
    with pytest.raises(RunLocked, match="not renewed"):
        frozen.check()
    successor = RunLock(open_store(), KEY, ttl_s=TTL, heartbeat_s=BEAT)
    successor.acquire(wait_s=5 * TTL)
    frozen.release()
    assert lease_of(s)["owner"] == successor.owner
    successor.check()
    successor.release()
    assert s.read_versioned(KEY) is None


def test_an_overwritten_lease_is_detected_as_lost_and_left_alone(open_store):
    s = open_store()
    # A long ttl: on a loaded machine a heartbeat can be late by more than TTL, and the lock
    # would then count itself lost for that reason first; this test is about the intruder.
    lock = RunLock(s, KEY, ttl_s=30.0, heartbeat_s=BEAT)
    lock.acquire()
    intruder = foreign_lease(age=0.0, ttl=60.0, host="intruder-host", pid=77)
    s.write_bytes(KEY, intruder)
    wait_for(lambda: lock.lost)
    with pytest.raises(RunLocked) as err:
        lock.check()
    assert "\n" not in str(err.value) and "intruder-host pid 77" in str(err.value)
    time.sleep(3 * BEAT)  # no heartbeat may write over the new owner's lease...
    lock.release()  # ...nor may release delete it
    assert s.read_bytes(KEY) == intruder


def test_bad_timings_are_refused(tmp_path):
    with pytest.raises(MaceError, match="heartbeat_s"):
        RunLock(LocalStorage(tmp_path), KEY, ttl_s=1.0, heartbeat_s=1.0)
