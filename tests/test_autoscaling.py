"""The driver's demand drives the autoscaler: more GPUs than present while the GPU stages
run (the explicit request and the pending workers), nothing once they are done."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import ray
from helpers import CONCEPTS, assert_same_erasure, erasure, request
from ray.autoscaler.v2.sdk import get_cluster_status
from ray.cluster_utils import Cluster
from ray.experimental.internal_kv import _internal_kv_get

from mace_ray.erase.driver import run_erase

REQUEST_KEY = "autoscaler_resource_request"  # where request_resources() leaves its bundles (v1)


@pytest.fixture
def one_gpu_cluster():
    c = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False}
    )
    c.add_node(num_cpus=1, num_gpus=1)
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()


def gpu_demand(address: str) -> tuple[float, float]:
    """(GPUs asked of the autoscaler by request_resources, GPUs of pending actors)."""
    raw = _internal_kv_get(REQUEST_KEY)
    requested = sum(b.get("GPU", 0) for b in json.loads(raw)) if raw else 0.0
    demands = get_cluster_status(address).resource_demands.ray_task_actor_demand
    pending = sum(r.bundle.get("GPU", 0) * r.count for d in demands for r in d.bundles_by_count)
    return requested, pending


def test_more_concepts_than_gpus_requests_more_gpus_then_none(one_gpu_cluster, reference_erasure, tmp_path):
    cfile = tmp_path / "concepts.txt"
    cfile.write_text(CONCEPTS)
    result: dict = {}
    seen: list[tuple[float, float]] = []

    def drive() -> None:
        try:
            req = request(cfile, tmp_path / "out", workers=3, gpus_per_worker=1, concepts_per_batch=1)
            result["report"] = run_erase(req)
        except BaseException as e:
            result["error"] = e

    t = threading.Thread(target=drive)
    t.start()
    while t.is_alive():
        seen.append(gpu_demand(one_gpu_cluster.address))
        time.sleep(0.5)
    assert "error" not in result, result.get("error")
    present = ray.cluster_resources().get("GPU", 0)
    assert present == 1
    # While the GPU stages ran: 3 workers' GPUs requested, 2 of them pending (only 1 GPU exists).
    assert max(r for r, _ in seen) == 3 > present
    assert max(p for _, p in seen) == 2
    # After: no request, no pending worker; the one real worker did all the work.
    time.sleep(1)
    assert gpu_demand(one_gpu_cluster.address) == (0, 0)
    rep = result["report"]
    assert len({c["where"]["worker"] for c in rep["concepts"]}) == 1
    assert_same_erasure(erasure(Path(rep["output"]["root"])), reference_erasure)
