"""Multi-node runs on ray.cluster_utils.Cluster: spread over nodes, and a node lost mid-run."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray
from helpers import CONCEPTS, BackgroundErase, assert_same_erasure, erasure, request
from ray.cluster_utils import Cluster

from mace_ray.erase.driver import run_erase

MORE_CONCEPTS = CONCEPTS + "Tom Hanks | celebrity\nMonet | style\ndog | object\ntruck | object | street\n"


@pytest.fixture
def cluster():
    """A head without GPUs and two worker nodes with one (fake) GPU each."""
    c = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False}
    )
    nodes = [c.add_node(num_cpus=1, num_gpus=1) for _ in range(2)]
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    yield c, nodes
    ray.shutdown()
    c.shutdown()


def test_concepts_spread_over_both_nodes(cluster, reference_erasure, tmp_path):
    c, nodes = cluster
    cfile = tmp_path / "concepts.txt"
    cfile.write_text(CONCEPTS)
    rep = run_erase(request(cfile, tmp_path / "out", workers=2, gpus_per_worker=1, concepts_per_batch=1))
    used_nodes = {x["where"]["node"] for x in rep["concepts"]}
    assert used_nodes == {n.node_id for n in nodes}  # both GPU nodes trained concepts, the head none
    assert_same_erasure(erasure(Path(rep["output"]["root"])), reference_erasure)


def test_worker_node_removed_mid_run(cluster, tmp_path):
    c, nodes = cluster
    cfile = tmp_path / "concepts.txt"
    cfile.write_text(MORE_CONCEPTS)
    out = tmp_path / "out"
    run = BackgroundErase.until_a_concept_is_done(
        request(cfile, out, workers=2, gpus_per_worker=1, concepts_per_batch=1), out, poll=0.2
    )
    assert list(out.glob("runs/*/concepts/*/DONE")), "no concept finished in time"
    c.remove_node(nodes[0])  # one of the two GPU nodes dies while the run goes on
    rep = run.result()
    assert rep["status"] == "complete"
    assert rep["workers"]["replaced"] >= 1

    # Same result as an unbroken single-process run of the same concepts.
    from mace_ray.erase.driver import run_erase as run_local

    ref = run_local(request(cfile, tmp_path / "ref", executor="local", concepts_per_batch=1))
    assert_same_erasure(erasure(Path(rep["output"]["root"])), erasure(Path(ref["output"]["root"])))
