"""Stage declarations that the runtime obeys: inputs checked before a stage starts, its
marker after it ends, its workers built from its placement and refused where it declares
none (mace_ray/engine/stages.py, declared.py, stage_workers.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from helpers import request

from mace_core.concepts import Concept, ConceptType
from mace_ray.audit.stages import AUDIT_STAGES
from mace_ray.engine.backend import LocalBackend
from mace_ray.engine.declared import Presence, given, state, stored
from mace_ray.engine.requests import WhereItRuns
from mace_ray.engine.resources import Resources
from mace_ray.engine.stage_workers import MAX_TEXT_WORKERS, STATS_ACTOR, TEXT_WORKER, StageWorkers
from mace_ray.engine.stages import Placement, Stage, StageError, Timer, run_stages
from mace_ray.erase.jobs import TextStats, TrainConcepts
from mace_ray.erase.run import ERASE_WORKERS
from mace_ray.erase.stages import CFR_STAGES, ERASE_STAGES
from mace_ray.eval.stages import EVAL_STAGES
from mace_ray.storage.local import LocalStorage

DOG = Concept("dog", ConceptType.OBJECT, "animal")


class Texty:
    """A text worker: serves text statistics only."""

    def __init__(self, spec: Any, name: str) -> None:
        self.name = name

    def setup(self) -> dict[str, str]:
        return {"worker": self.name}

    def text_stats(self, concepts: list[Concept]) -> int:
        return len(concepts)


class Gpu(Texty):
    """A GPU worker: trains."""

    def train(self, concepts: list[Concept]) -> list[str]:
        return [c.slug for c in concepts]


class Sums:
    def __init__(self, spec: Any) -> None:
        self.n = 0

    def add(self, k: int) -> int:
        self.n += k
        return self.n


class Cluster(LocalBackend):
    """Runs everything in this process, but sizes workers like a cluster of 6 CPUs and 2
    GPUs, and records what is spawned, with which resources, and what is killed."""

    name = "fake-cluster"

    def __init__(self) -> None:
        self.spawned: list[tuple[str, Resources, bool]] = []
        self.killed: list[str] = []
        self.requests: list[int] = []

    def spawn(
        self, cls: type, args: tuple, resources: Resources, name: str, restartable: bool = False
    ) -> Any:
        self.spawned.append((cls.__name__, resources, restartable))
        return super().spawn(cls, args, resources, name, restartable)

    def kill(self, handle: Any) -> None:
        self.killed.append(type(handle).__name__)

    def request_resources(self, bundles: list[dict[str, float]]) -> None:
        self.requests.append(len(bundles))

    def gpus_available(self) -> float:
        return 2.0

    def cpus_available(self) -> float:
        return 6.0


@dataclass
class Run:
    """A run's state, as run_stages needs it."""

    storage: LocalStorage
    workers: StageWorkers
    seen: list[str] = field(default_factory=list)
    total: Any = None


def make_run(tmp_path: Path, backend: Any = None) -> Run:
    kinds = {Placement.TEXT: (Texty, "t"), Placement.GPU: (Gpu, "g"), Placement.STATS: (Sums, "s")}
    workers = StageWorkers(backend or LocalBackend(), None, kinds, WhereItRuns(), "sess", "run")
    return Run(LocalStorage(tmp_path / "out"), workers)


def stage(name: str, run: Any, placement: Placement = Placement.DRIVER, **kw: Any) -> Stage[Run]:
    decl = {"reads": given("nothing"), "writes": "nothing", "marker": given("none")} | kw
    return Stage(name, placement, decl["reads"], decl["writes"], decl["marker"], run, decl.get("calls", ()))


def writes(key: str):
    def run(ctx: Run) -> None:
        ctx.seen.append(key)
        ctx.storage.write_bytes(key, b"{}")

    return run


def test_stages_run_in_order_and_are_timed_once(tmp_path):
    run = make_run(tmp_path)
    stages = [stage(n, lambda ctx, n=n: ctx.seen.append(n)) for n in "abc"]
    timer = Timer()
    run_stages(stages, run, timer)
    assert run.seen == ["a", "b", "c"] and list(timer.seconds) == ["a", "b", "c"]


def test_a_stage_that_does_not_write_its_marker_fails_with_its_name(tmp_path):
    run = make_run(tmp_path)
    marker = stored("x.json of each part", lambda ctx: ["parts/a/x.json", "parts/b/x.json"])
    stages = [
        stage("one", writes("parts/a/x.json"), marker=marker),  # forgets parts/b
        stage("two", writes("later.json")),
    ]
    with pytest.raises(StageError, match=r"^stage one: parts/b/x.json is missing after it ended \(x.json of"):
        run_stages(stages, run, Timer())
    assert run.seen == ["parts/a/x.json"]  # the next stage never ran
    # Written as declared, the same stages run through.
    stages[0] = stage("one", lambda ctx: [writes(k)(ctx) for k in ("parts/a/x.json", "parts/b/x.json")],
                      marker=marker)  # fmt: skip
    run_stages(stages, run, Timer())
    assert (tmp_path / "out" / "later.json").exists()


def test_a_stage_whose_input_is_missing_fails_before_it_starts(tmp_path):
    run = make_run(tmp_path)
    timer = Timer()
    stages = [
        stage("make", writes("a.json"), marker=stored("a.json", lambda ctx: ["a.json"])),
        stage("use", writes("b.json"), reads=stored("a.json and c.json", lambda ctx: ["a.json", "c.json"])),
    ]
    with pytest.raises(StageError, match=r"^stage use: c.json is missing before it starts"):
        run_stages(stages, run, timer)
    assert run.seen == ["a.json"] and list(timer.seconds) == ["make"]  # "use" never started
    # State an earlier stage leaves is checked the same way.
    needs_total = stage("sum", lambda ctx: None, reads=state("the total", "total"))
    with pytest.raises(StageError, match=r"^stage sum: run state 'total' is missing before it starts"):
        run_stages([needs_total], run, Timer())
    run.total = 3
    run_stages([needs_total], run, Timer())


class Counting:
    """A storage that is not a local folder (those are checked by a stat a key), counting
    its listings and single-key requests."""

    def __init__(self, root: Path) -> None:
        self.inner = LocalStorage(root)
        self.lists = self.heads = 0

    def write_bytes(self, key: str, data: bytes) -> None:
        self.inner.write_bytes(key, data)

    def list(self, prefix: str) -> list[str]:
        self.lists += 1
        return self.inner.list(prefix)

    def exists(self, key: str) -> bool:
        self.heads += 1
        return self.inner.exists(key)


def test_markers_of_many_concepts_cost_one_listing(tmp_path):
    storage = Counting(tmp_path)
    done = [f"runs/r/concepts/c{i:04d}/DONE" for i in range(100)]
    for key in done[:-1]:
        storage.write_bytes(key, b"")
    storage.write_bytes("runs/r/cfr/M.safetensors", b"")
    storage.lists = storage.heads = 0
    presence = Presence(storage)  # type: ignore[arg-type]
    assert presence.missing(done) == [done[-1]]
    assert (storage.lists, storage.heads) == (1, 0)  # one listing of runs/r/concepts
    # The next stage's inputs: those found present are not asked for again; a few
    # scattered keys are asked one by one.
    presence.look()
    assert presence.missing(done[:-1] + ["runs/r/cfr/M.safetensors", "runs/r/cfr/gone"]) == [
        "runs/r/cfr/gone"
    ]
    assert (storage.lists, storage.heads) == (1, 2)
    # What was absent is looked for again after the next stage wrote it.
    storage.write_bytes(done[-1], b"")
    presence.look()
    assert presence.missing(done) == [] and (storage.lists, storage.heads) == (1, 3)
    # Keys among many other files are never listed.
    data = [f"data/k{i:04d}/data.json" for i in range(100)]
    assert presence.missing(data, listing=False) == data and storage.lists == 1


def test_pools_are_built_from_the_placements_the_stages_declare(tmp_path):
    cluster = Cluster()
    run = make_run(tmp_path, cluster)
    jobs = [TextStats([DOG], label=f"t{i}") for i in range(20)]
    stages = [
        stage("texts", lambda ctx: ctx.workers.run(jobs), Placement.TEXT),
        stage("gpus", lambda ctx: ctx.workers.run([TrainConcepts([DOG], label="train")]), Placement.GPU),
        stage(
            "sums",
            lambda ctx: setattr(ctx, "total", ctx.workers.call(Placement.STATS, "add", 2)),
            Placement.GPU,
            calls=(Placement.STATS,),
        ),  # fmt: skip
        stage("last", lambda ctx: None),
    ]
    run_stages(stages, run, Timer())
    text = [(r, restart) for cls, r, restart in cluster.spawned if cls == "Texty"]
    # 20 jobs, 6 CPUs: 5 text workers (the driver keeps a core), each the text worker's shape.
    assert text == [(TEXT_WORKER, False)] * min(5, MAX_TEXT_WORKERS)
    # One GPU worker per GPU, never more than there are jobs: 1 here, with 1 GPU.
    assert [r for cls, r, _ in cluster.spawned if cls == "Gpu"] == [Resources(cpus=1, gpus=1)]
    assert [(r, restart) for cls, r, restart in cluster.spawned if cls == "Sums"] == [(STATS_ACTOR, True)]
    assert cluster.requests == [1, 0]  # the GPU worker asked of the autoscaler, then given back
    # Text workers stop with their jobs; GPU workers and the actor after their last stage.
    assert cluster.killed == ["Texty"] * 5 + ["Gpu", "Sums"]
    assert run.workers.built[Placement.GPU].summary()["resources"] == vars(Resources(cpus=1, gpus=1))


def test_a_stage_placed_on_the_wrong_workers_fails_with_its_name(tmp_path):
    run = make_run(tmp_path)
    train = [TrainConcepts([DOG], label="train")]
    misplaced = stage("train", lambda ctx: ctx.workers.run(train), Placement.TEXT)
    with pytest.raises(
        StageError, match=r"^stage train: TrainConcepts jobs call train\(\), which Texty \(cpu"
    ):
        run_stages([misplaced], run, Timer())
    undeclared = stage("fusion", lambda ctx: ctx.workers.call(Placement.STATS, "add", 1), Placement.GPU)
    with pytest.raises(
        StageError, match=r"^stage fusion: add\(\) on the statistics actor, but it declares gpu"
    ):
        run_stages([undeclared], run, Timer())
    on_driver = stage("report", lambda ctx: ctx.workers.run(train))
    with pytest.raises(StageError, match=r"^stage report: jobs, but it runs on the driver: no workers"):
        run_stages([on_driver], run, Timer())


@pytest.mark.parametrize("stages", [ERASE_STAGES, CFR_STAGES, EVAL_STAGES, AUDIT_STAGES])
def test_declared_tables_are_checkable(stages):
    names = [s.name for s in stages]
    assert len(set(names)) == len(names)
    assert all(s.reads.text and s.writes and s.marker.text for s in stages)
    # Every marker is something the runtime checks: stored keys or the run's state.
    assert all(s.marker.keys is not None or s.marker.held is not None for s in stages)
    assert all(p is not Placement.DRIVER for s in stages for p in s.calls)


def test_every_erase_placement_has_its_workers():
    declared = {p for s in ERASE_STAGES + CFR_STAGES for p in s.placements} - {Placement.DRIVER}
    assert declared == set(ERASE_WORKERS)


def test_an_erase_stage_that_skips_its_marker_fails_the_run_with_its_name(tmp_path, monkeypatch):
    """The real erase: a text worker that forgets one concept's statistics fails the run
    at the end of text_statistics, named, before any GPU worker starts."""
    from mace_ray.erase.driver import run_erase
    from mace_ray.erase.text_worker import TextWorker

    real = TextWorker.text_stats

    def forgetful(self: TextWorker, concepts: list[Concept]) -> int:
        return real(self, [c for c in concepts if c.text != "airplane"])

    monkeypatch.setattr(TextWorker, "text_stats", forgetful)
    cfile = tmp_path / "c.txt"
    cfile.write_text("Van Gogh | style\nairplane | object | sky\n")
    with pytest.raises(StageError, match=r"stage text_statistics: runs/\w+/concepts/airplane-\w+/stats.saf"):
        run_erase(request(cfile, tmp_path / "out", executor="local"))
    (manifest,) = (tmp_path / "out").glob("runs/*/manifest.json")
    record = json.loads(manifest.read_text())
    assert record["status"] == "failed" and record["error"].startswith("StageError: stage text_statistics")
    assert not list((tmp_path / "out").glob("data/*"))  # no GPU stage ran
