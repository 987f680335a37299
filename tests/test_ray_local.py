"""The Ray executor on a local Ray (fake GPUs) gives the single-process result."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray
from helpers import CONCEPTS, BackgroundErase, assert_same_erasure, erasure, request

from mace_ray.erase.driver import run_erase


@pytest.mark.parametrize("workers", [1, 2])
def test_ray_matches_single_process(local_ray, reference_erasure, tmp_path, workers):
    cfile = tmp_path / "concepts.txt"
    cfile.write_text(CONCEPTS)
    # concepts_per_batch auto: a CPU worker holds 4, capped so that every worker gets work.
    rep = run_erase(request(cfile, tmp_path / "out", workers=workers, gpus_per_worker=1))
    assert rep["executor"] == "ray" and rep["workers"]["size"] == workers
    assert rep["workers"]["resources"]["gpus"] == 1
    assert_same_erasure(erasure(Path(rep["output"]["root"])), reference_erasure)
    assert all(w["batch_plan"]["concepts_per_batch"] == 4 for w in rep["workers"]["where"].values())
    # The celebrities and the style share training settings, the object has its own lr:
    # one batch of 4 trains groups of 3 and 1; batches of 2 train groups of 2, 1 and 1.
    batches = [c["train_batch"] for c in rep["concepts"]]
    assert batches == ([3, 3, 1, 3] if workers == 1 else [2, 2, 1, 1])
    # Every concept names the worker that trained it; with 2 workers both took batches.
    used = {c["where"]["worker"] for c in rep["concepts"]}
    assert len(used) == workers


def test_fractional_gpus_share_a_gpu(local_ray, reference_erasure, tmp_path):
    cfile = tmp_path / "concepts.txt"
    cfile.write_text(CONCEPTS)
    rep = run_erase(request(cfile, tmp_path / "out", workers=2, gpus_per_worker=0.5, concepts_per_batch=1))
    assert rep["workers"]["resources"]["gpus"] == 0.5
    assert_same_erasure(erasure(Path(rep["output"]["root"])), reference_erasure)


def test_statistics_actor_restart_rebuilds_from_storage(local_ray, reference_erasure, tmp_path):
    """Kill the statistics actor mid-run: Ray restarts it, it rebuilds its sums from storage."""
    cfile = tmp_path / "concepts.txt"
    cfile.write_text(CONCEPTS)
    out = tmp_path / "out"
    run = BackgroundErase.until_a_concept_is_done(
        request(cfile, out, workers=1, gpus_per_worker=1, concepts_per_batch=1), out
    )
    (root,) = list(out.glob("runs/*"))
    (name,) = [n for n in ray.util.list_named_actors() if n.startswith(f"mace-stats-{root.name[:8]}-")]
    actor = ray.get_actor(name)
    ray.kill(actor, no_restart=False)  # a crash, not a shutdown: Ray restarts it
    run.result()
    assert_same_erasure(erasure(root), reference_erasure)


class _Crasher:
    """An actor whose one method kills its process: a crash that recurs on every retry."""

    def crash(self) -> None:
        import os

        os._exit(1)


def test_a_crash_that_recurs_ends_after_bounded_restarts(local_ray):
    """The statistics actor is restartable, but not forever: a recurring crash surfaces as
    an actor error after STATS_MAX_RESTARTS restarts instead of looping."""
    from ray.exceptions import RayActorError

    from mace_ray.engine.backend import STATS_MAX_RESTARTS, RayBackend
    from mace_ray.engine.resources import Resources

    assert 0 < STATS_MAX_RESTARTS < 10
    backend = RayBackend()
    handle = backend.spawn(_Crasher, (), Resources(cpus=0), "mace-test-crasher", restartable=True)
    with pytest.raises(RayActorError):
        ray.get(handle.crash.remote(), timeout=240)


def test_a_worker_shape_no_node_holds_fails_at_once_and_writes_nothing(local_ray, tmp_path):
    """A local Ray has no autoscaler: 4 GPUs per worker on a 2-GPU cluster can never start.
    Refused in one line before any run state is written (Ray would keep the actors pending)."""
    import time

    from mace_ray.engine.placement import PlacementError

    cfile = tmp_path / "concepts.txt"
    cfile.write_text(CONCEPTS)
    t = time.monotonic()
    with pytest.raises(PlacementError) as e:
        run_erase(request(cfile, tmp_path / "out", gpus_per_worker=4))
    assert time.monotonic() - t < 120  # prepare loads the text encoder; no waiting after it
    msg = str(e.value)
    assert "\n" not in msg and "--gpus-per-worker 4" in msg and "no autoscaler" in msg
    assert not (tmp_path / "out").exists()  # no run folder, no lease: no locks/ folder either
