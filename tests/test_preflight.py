"""Preflight checks: a bad output or an impossible worker shape fails in seconds, in one line.

Storage against the real SeaweedFS server (tests/s3server.py) and closed or silent local
ports; placement against a real local Ray without GPUs, and this machine.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
import torch
from helpers import small_local_ray
from s3server import READER_ACCESS_KEY, READER_SECRET_KEY, S3Server, free_ports

from mace_core.errors import MaceError
from mace_ray.engine.backend import (
    LocalBackend,
    RayBackend,
    autoscaler_from_v1_status,
    autoscaler_from_v2_status,
    local_machine_resources,
)
from mace_ray.engine.placement import PlacementError, check_placeable
from mace_ray.engine.resources import Resources
from mace_ray.storage.base import StorageError
from mace_ray.storage.probe import preflight_storage

BUDGET = 3.0


def everything_in(server: S3Server, bucket: str) -> list[str]:
    """Every object and object version in the bucket, hidden names and delete markers too."""
    resp = server.client().list_object_versions(Bucket=bucket)
    return sorted(v["Key"] for kind in ("Versions", "DeleteMarkers") for v in resp.get(kind, []))


def one_line_error(url: str, endpoint: str, budget_s: float = BUDGET) -> tuple[str, float]:
    t = time.monotonic()
    with pytest.raises(StorageError) as e:
        preflight_storage(url, s3_endpoint=endpoint, budget_s=budget_s)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(url)
    assert "completed work is kept" not in msg and "resume" not in msg
    return msg, time.monotonic() - t


# --- storage ---------------------------------------------------------------------------


def test_closed_port_fails_within_the_budget_naming_the_endpoint(aws_env, bucket):
    (port,) = free_ports(1)  # nothing listens there: connection refused
    msg, took = one_line_error(f"s3://{bucket}/runs", f"http://127.0.0.1:{port}")
    assert f"http://127.0.0.1:{port}" in msg and "unreachable" in msg and "--s3-endpoint" in msg
    assert took < BUDGET + 2


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that takes one connection into its backlog and never answers (a hung or
    blackholed server: the first request times out reading, later connects time out)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen(0)
        yield s.getsockname()[1]


def test_silent_server_fails_within_the_budget(aws_env, bucket, silent_port):
    msg, took = one_line_error(f"s3://{bucket}", f"http://127.0.0.1:{silent_port}")
    assert f"127.0.0.1:{silent_port}" in msg and "unreachable" in msg
    assert BUDGET / 2 < took < BUDGET + 2  # it did wait for an answer, but not for long


class NotFound(BaseHTTPRequestHandler):
    """A web server (or a proxy in front of a dead host) that answers 404 to everything."""

    def _404(self) -> None:
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = do_GET = do_PUT = _404

    def log_message(self, *args: object) -> None:
        pass


def test_a_404_that_is_not_from_s3_is_not_a_missing_bucket(aws_env, bucket):
    server = ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        msg, took = one_line_error(f"s3://{bucket}/x", endpoint, budget_s=15)
    finally:
        server.shutdown()
        server.server_close()
    assert "is it an S3 server?" in msg and endpoint in msg and "does not exist" not in msg
    assert took < 3


def test_missing_bucket_is_one_line_and_immediate(aws_env):
    msg, took = one_line_error("s3://no-such-bucket-7/x", aws_env.endpoint, budget_s=15)
    assert "bucket 'no-such-bucket-7' does not exist" in msg and aws_env.endpoint in msg
    assert took < 3


def test_read_only_credentials_are_refused_and_nothing_is_written(aws_env, bucket, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", READER_ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", READER_SECRET_KEY)
    msg, took = one_line_error(f"s3://{bucket}/runs", aws_env.endpoint, budget_s=15)
    assert "read-only" in msg and "AccessDenied" in msg and repr(bucket) in msg
    assert READER_SECRET_KEY not in msg
    assert took < 3
    assert everything_in(aws_env, bucket) == []


def test_wrong_secret_is_refused_at_once(aws_env, bucket, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-0123")
    msg, took = one_line_error(f"s3://{bucket}/runs", aws_env.endpoint, budget_s=15)
    assert "SignatureDoesNotMatch" in msg and "wrong-secret-0123" not in msg
    assert took < 3


@pytest.mark.parametrize("prefix", ["", "/runs/a"])
def test_good_bucket_passes_and_leaves_nothing(aws_env, bucket, prefix):
    aws_env.client().put_object(Bucket=bucket, Key="keep/me", Body=b"x")  # not the probe's to touch
    preflight_storage(f"s3://{bucket}{prefix}", s3_endpoint=aws_env.endpoint, budget_s=BUDGET)
    assert everything_in(aws_env, bucket) == ["keep/me"]


def test_versioned_bucket_keeps_no_probe_version(aws_env, bucket):
    client = aws_env.client()
    client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    preflight_storage(f"s3://{bucket}/runs", s3_endpoint=aws_env.endpoint, budget_s=BUDGET)
    assert everything_in(aws_env, bucket) == []


def test_local_output_is_checked_and_not_created(tmp_path):
    target = tmp_path / "new" / "out"
    preflight_storage(str(target))
    assert not (tmp_path / "new").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match="is a file, not a folder"):
        preflight_storage(str(tmp_path / "file"))


# --- placement: this machine -----------------------------------------------------------


def test_local_executor_refuses_more_gpus_than_this_machine_has():
    gpus = torch.cuda.device_count() + 1  # whole, so valid for any count
    with pytest.raises(PlacementError) as e:
        check_placeable(LocalBackend(), Resources(cpus=1, gpus=gpus), 1, what=f"--gpus-per-worker {gpus}")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"--gpus-per-worker {gpus}: ")
    assert f"this machine has {gpus - 1} GPUs" in msg
    assert isinstance(e.value, MaceError)


def test_local_executor_checks_cpus_and_memory_too():
    machine = local_machine_resources()
    assert check_placeable(LocalBackend(), Resources(cpus=1), 64) == int(machine["CPU"])
    with pytest.raises(PlacementError, match="CPUs"):
        check_placeable(LocalBackend(), Resources(cpus=machine["CPU"] + 1), 1)
    too_much = machine["memory"] / 2**30 * 2
    with pytest.raises(PlacementError, match="GB of memory"):
        check_placeable(LocalBackend(), Resources(cpus=1, memory_gb=too_much), 1)


# --- placement: autoscaler detection ---------------------------------------------------

HEAD = "node_" + "ab" * 28


def test_readonly_and_launcher_autoscaler_reports():
    readonly = {"autoscaler_report": {"active_nodes": {HEAD: 1}, "node_type_mapping": {"ab": HEAD}}}
    assert autoscaler_from_v1_status(json.dumps(readonly)) is None
    assert autoscaler_from_v1_status(None) is None  # no monitor
    launcher = {"autoscaler_report": {"active_nodes": {"ray.head.default": 1}, "pending_launches": {}}}
    assert "ray.head.default" in autoscaler_from_v1_status(json.dumps(launcher))
    launching = {"autoscaler_report": {"active_nodes": {HEAD: 1}, "pending_launches": {"gpu": 1}}}
    assert autoscaler_from_v1_status(json.dumps(launching)) is not None

    def v2(*types: str, launches: tuple = ()) -> SimpleNamespace:
        nodes = [SimpleNamespace(ray_node_type_name=t) for t in types]
        return SimpleNamespace(active_nodes=nodes, idle_nodes=[], pending_nodes=[], pending_launches=launches)

    assert autoscaler_from_v2_status(v2(HEAD)) is None
    assert "gpu-group" in autoscaler_from_v2_status(v2(HEAD, "gpu-group"))
    assert autoscaler_from_v2_status(v2(HEAD, launches=("x",))) is not None


class GrowingCluster:
    """A backend whose autoscaler adds a GPU node at the second look after a request."""

    name = "ray"

    def __init__(self) -> None:
        self.nodes = [{"CPU": 4.0, "memory": 8 * 2**30}]
        self.requests: list[list[dict]] = []
        self.looks = 0

    def node_resources(self) -> list[dict[str, float]]:
        if self.requests and self.requests[-1]:
            self.looks += 1
            if self.looks == 2:
                self.nodes.append({"CPU": 8.0, "GPU": 2.0, "memory": 32 * 2**30})
        return list(self.nodes)

    def autoscaler(self) -> str:
        return "a test autoscaler"

    def request_resources(self, bundles: list[dict]) -> None:
        self.requests.append(bundles)


def test_waits_for_the_autoscaler_to_add_a_node():
    cluster = GrowingCluster()
    assert check_placeable(cluster, Resources(cpus=1, gpus=1), 3, wait_s=30, poll_s=0.01) == 2
    assert cluster.requests == [[{"CPU": 1.0, "GPU": 1.0}] * 3]  # asked once, left for the driver


# --- placement: a real local Ray without GPUs ------------------------------------------


@pytest.fixture(scope="module")
def cpu_ray():
    """A local Ray with 2 CPUs and no GPU, as `ray.init()` gives on a CPU machine."""
    with small_local_ray(num_gpus=0):
        yield RayBackend()


def test_gpu_worker_on_a_cpu_ray_fails_at_once(cpu_ray):
    t = time.monotonic()
    with pytest.raises(PlacementError) as e:
        # A wait that did happen would end after 20s, failing the timing below.
        check_placeable(cpu_ray, Resources(cpus=1, gpus=1), 4, wait_s=20, what="--gpus-per-worker 1")
    msg = str(e.value)
    assert time.monotonic() - t < 10  # no wait: nothing could add a GPU
    assert "\n" not in msg and msg.startswith("--gpus-per-worker 1: ")
    assert "the Ray cluster has 0 GPUs" in msg and "2 CPU" in msg and "no autoscaler" in msg


def test_local_ray_has_no_autoscaler(cpu_ray):
    from ray.experimental.internal_kv import _internal_kv_get

    deadline = time.monotonic() + 20
    while not _internal_kv_get("__autoscaling_status") and time.monotonic() < deadline:
        time.sleep(0.5)  # the head's read-only monitor reports every few seconds
    assert _internal_kv_get("__autoscaling_status"), "the monitor never reported"
    assert cpu_ray.autoscaler() is None


def test_cpu_workers_fit_and_memory_is_checked(cpu_ray):
    assert check_placeable(cpu_ray, Resources(cpus=1), 4) == 2
    assert check_placeable(cpu_ray, Resources(cpus=0.5, memory_gb=0.1), 3) == 3
    with pytest.raises(PlacementError, match=r"GB of memory .*no autoscaler"):
        check_placeable(cpu_ray, Resources(cpus=1, memory_gb=100_000), 1)
    with pytest.raises(PlacementError, match="has 2 CPUs"):
        check_placeable(cpu_ray, Resources(cpus=3), 1)


def test_an_autoscaler_that_adds_nothing_fails_after_the_wait(cpu_ray, monkeypatch):
    from ray.experimental.internal_kv import _internal_kv_get

    requested: list[list[dict]] = []
    real = cpu_ray.request_resources

    def record(bundles: list[dict]) -> None:
        requested.append(bundles)
        real(bundles)

    monkeypatch.setattr(cpu_ray, "autoscaler", lambda: "a test autoscaler")
    monkeypatch.setattr(cpu_ray, "request_resources", record)
    t = time.monotonic()
    with pytest.raises(PlacementError) as e:
        check_placeable(cpu_ray, Resources(cpus=1, gpus=1), 2, wait_s=2, poll_s=0.5)
    assert 2 <= time.monotonic() - t < 8
    msg = str(e.value)
    assert "\n" not in msg and "added no such node within 2s" in msg and "0 GPU" in msg
    assert requested == [[{"CPU": 1.0, "GPU": 1.0}] * 2, []]  # asked, then withdrawn
    assert json.loads(_internal_kv_get("autoscaler_resource_request") or b"[]") == []
