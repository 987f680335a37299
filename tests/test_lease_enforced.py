"""The run lock enforced on every write (issue 28 item 6): a driver whose lease lapses stops
before its next write, its workers too, and a second driver's run is never deleted or written
over by it; renewals and release stay short however slow S3 is.

Against the real S3 server (tests/s3server.py) behind a proxy that delays its responses on
demand (tests/s3proxy.py), and one end-to-end erase on a local folder whose lease is taken
over while a worker computes.
"""

from __future__ import annotations

import json
import pickle
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import request
from s3proxy import SlowProxy

from mace_ray.storage.base import Storage
from mace_ray.storage.lease import RunLock, RunLocked
from mace_ray.storage.lease_guard import lease_guarded
from mace_ray.storage.local import LocalStorage
from mace_ray.storage.s3 import S3Storage

KEY = "locks/run.json"
# Writes stop 3 s after the last confirmed renewal; another driver may take over after 4 s of
# silence; each renewal request has 0.5 s (connect 0.125 s + read 0.25 s, retries included).
TTL, BEAT = 4.0, 0.25


@pytest.fixture
def proxy(s3_server, aws_env):
    p = SlowProxy(int(s3_server.endpoint.rsplit(":", 1)[1]))
    yield p
    p.delay = 0.0
    p.close()


def lease_of(storage: Storage) -> dict:
    current = storage.read_versioned(KEY)
    assert current is not None
    return json.loads(current[0])


def wait_for(cond: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def refused(storage: Storage, key: str) -> bool:
    try:
        storage.write_bytes(key, b"worker")
        return False
    except RunLocked:
        return True


def test_a_driver_on_a_slow_s3_stops_before_its_next_write_and_never_takes_the_next_run(
    s3_server, bucket, proxy
):
    url = f"s3://{bucket}/out"
    direct = S3Storage(url, s3_server.endpoint, retry_seconds=5)
    # Driver A reaches S3 through the proxy; its worker (on another node) directly.
    a = RunLock(S3Storage(url, proxy.endpoint, retry_seconds=5), KEY, ttl_s=TTL, heartbeat_s=BEAT)
    a.acquire()
    a_run = a.storage.guarded(a.check)
    a_worker = lease_guarded(S3Storage(url, s3_server.endpoint, retry_seconds=5), a.ref)
    a_run.write_bytes("runs/r/manifest.json", b"A")
    a_worker.write_bytes("runs/r/concepts/x/DONE", b"A")

    # 1. Slow but answering: A keeps its lease; B, waiting past the ttl, is refused.
    proxy.delay = 0.05
    b = RunLock(S3Storage(url, s3_server.endpoint, retry_seconds=5), KEY, ttl_s=TTL, heartbeat_s=BEAT)
    with pytest.raises(RunLocked, match="held by another driver"):
        b.acquire(wait_s=1.5 * TTL)
    assert not a.lost
    a_run.write_bytes("runs/r/manifest.json", b"A2")
    assert direct.read_bytes("runs/r/manifest.json") == b"A2"

    # 2. Too slow: A's renewals time out, and A stops writing before its lease can be taken.
    proxy.delay = 30.0
    wait_for(lambda: a.lost, timeout=3 * TTL)
    stopped = time.time()
    assert stopped - lease_of(direct)["heartbeat"] < TTL
    t0 = time.monotonic()
    with pytest.raises(RunLocked, match="not renewed") as err:
        a_run.write_bytes("runs/r/late", b"A")
    assert time.monotonic() - t0 < 2 and "\n" not in str(err.value)  # refused, nothing sent
    assert not direct.exists("runs/r/late")
    # Its worker stops too once the lease goes unrenewed, also before it can be taken.
    wait_for(lambda: refused(a_worker, "runs/r/concepts/y/DONE"), timeout=3 * TTL)
    stopped = time.time()
    assert stopped - lease_of(direct)["heartbeat"] < TTL

    # 3. B takes the lapsed lease over, deletes the run (--no-resume) and writes its own.
    b.acquire(wait_s=3 * TTL)
    b_run = b.storage.guarded(b.check)
    b_run.delete_prefix("runs/r")
    b_run.write_bytes("runs/r/manifest.json", b"B")

    # 4. S3 answers A again: A writes and deletes nothing, its worker neither (naming B's
    # lease), and its release leaves B's lease alone.
    proxy.delay = 0.0
    for write in (
        lambda: a_run.write_bytes("runs/r/manifest.json", b"A3"),
        lambda: a_run.delete_prefix("runs"),
    ):
        with pytest.raises(RunLocked):
            write()
    with pytest.raises(RunLocked, match=r"taken over by host \S+ pid \d+"):
        a_worker.write_bytes("runs/r/concepts/x/DONE", b"A")
    shipped = pickle.loads(pickle.dumps(a_worker))  # as Ray ships a storage: the guard goes along
    with pytest.raises(RunLocked, match="taken over"):
        shipped.put_dir(Path(__file__).parent, "runs/r/final")
    a.release()
    assert lease_of(direct)["owner"] == b.owner
    assert direct.list("runs") == ["runs/r/manifest.json"]
    assert direct.read_bytes("runs/r/manifest.json") == b"B"
    b.release()
    assert direct.read_versioned(KEY) is None


def test_release_and_renewals_stay_short_when_s3_stalls(s3_server, bucket, proxy):
    lock = RunLock(
        S3Storage(f"s3://{bucket}/out", proxy.endpoint, retry_seconds=5), KEY, ttl_s=TTL, heartbeat_s=BEAT
    )
    lock.acquire()
    proxy.delay = 30.0  # S3 takes every request and never answers
    time.sleep(2 * BEAT)  # a renewal is under way, held by the proxy
    t0 = time.monotonic()
    lock.release()  # what SIGTERM's handler calls, with Ray's 3 s grace
    assert time.monotonic() - t0 < 2.5
    # The renewal thread gave up within its budget, too: it no longer holds anything open.
    assert not lock.held


def test_a_worker_that_finds_the_lease_taken_over_stops_the_run_in_one_line(tmp_path, monkeypatch):
    """End to end (a partial erase: text statistics only): another driver takes the lease over
    while a worker computes; the worker writes nothing, the driver writes nothing after it
    (the manifest stays as it was), and the error names the new holder."""
    import mace_ray.erase.text_worker as text_worker
    from mace_ray.erase.driver import run_erase

    out = tmp_path / "out"
    cfile = tmp_path / "c.txt"
    cfile.write_text("airplane | object\n")
    captions = tmp_path / "captions.txt"  # a small prior: the test is about the lease
    captions.write_text("a photo of a street\na dog on the grass\n")
    compute = text_worker.concept_text_stats

    def taken_over_meanwhile(*args, **kwargs):
        stats = compute(*args, **kwargs)
        (lease,) = (out / "locks").glob("*.json")
        intruder = {
            "owner": uuid.uuid4().hex,
            "host": "other-host",
            "pid": 77,
            "heartbeat": time.time(),
            "ttl_s": 60,
        }
        LocalStorage(out).write_bytes(f"locks/{lease.name}", json.dumps(intruder).encode())
        time.sleep(1.1)  # past the worker's re-read interval of the lease (its last write: the prior)
        return stats

    monkeypatch.setattr(text_worker, "concept_text_stats", taken_over_meanwhile)
    with pytest.raises(RunLocked) as err:
        run_erase(
            request(cfile, out, executor="local", stages="text_statistics", prior_captions=str(captions))
        )
    msg = str(err.value)
    assert "\n" not in msg and "taken over by host other-host pid 77" in msg
    (run,) = (out / "runs").iterdir()
    assert (
        json.loads((run / "manifest.json").read_text())["status"] == "running"
    )  # not "failed": not its to write
    assert not list(Path(run).glob("concepts/*/stats.safetensors"))
    (lease,) = (out / "locks").glob("*.json")
    assert json.loads(lease.read_text())["host"] == "other-host"  # released nothing of the new holder's
