"""Autoscaling for real: `mace-ray erase` on Ray's fake multi-node autoscaler
(cluster/fake-autoscaler.yaml, through benchmarks/autoscaling_timeline.py). The head holds no
GPU worker, so the run finishes only if the autoscaler adds GPU nodes; they must come after
the driver asks, serve the GPU stages, and go once the run is over. About 3 minutes on 2 cores."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from helpers import CONCEPTS, FLAGS, assert_same_erasure, erasure

ROOT = Path(__file__).resolve().parents[1]
BOUND_S = 120  # scale-down: 15 s idle timeout + 1 s updates, with room for a loaded machine


def timeline_module():
    spec = importlib.util.spec_from_file_location(
        "autoscaling_timeline", ROOT / "benchmarks" / "autoscaling_timeline.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_fake_autoscaler_adds_gpu_nodes_for_the_run_and_removes_them_after(reference_erasure, tmp_path):
    at = timeline_module()
    assert at.CONCEPTS == CONCEPTS and at.FLAGS == FLAGS  # the reference's inputs
    res = at.measure(tmp_path, bound_s=BOUND_S, local=False)
    assert res["erase_rc"] == 0, res.get("driver_tail")
    gpu = {n["node_id"]: n for n in res["gpu_nodes"]}
    stages = res["stages"]
    # The head cannot hold a GPU worker: every GPU node was added by the autoscaler.
    assert res["head"]["gpus"] == 0
    assert res["cluster"]["head"]["GPU"] == 0 and res["cluster"]["gpu_node"]["GPU"] == 1
    # None before the run asked for GPU workers (preflight or workers_start), at least one after.
    asked = res["gpu_first_asked_at"]
    assert asked is not None and gpu, res["timeline"]
    assert res["gpu_nodes_before_ask"] == [] and all(n["added"] > asked for n in gpu.values())
    # At least one joined while a GPU stage ran, and every GPU stage had GPU nodes.
    gpu_stages = [s for s in at.GPU_STAGES if s in stages]
    assert gpu_stages == list(at.GPU_STAGES), stages.keys()
    assert any(stages[s]["gpu_nodes_added"] for s in gpu_stages), res["timeline"]
    assert all(stages[s]["gpu_nodes_alive"] for s in gpu_stages), stages
    assert len(gpu) <= res["cluster"]["gpu_nodes_max"]
    # Every concept was trained on a GPU node.
    assert set(res["concepts_per_node"]) <= gpu.keys(), res["concepts_per_node"]
    # All of them gone after the run, within the bound.
    assert res["all_gpu_nodes_removed"], res["timeline"]
    assert all(n["removed"] > res["last_stage_done_at"] for n in gpu.values())
    assert res["scale_down_after_driver_exit_s"] <= BOUND_S
    # The same weights as the local run of the same inputs.
    assert_same_erasure(erasure(Path(res["ray_root"])), reference_erasure, atol=1e-5)
