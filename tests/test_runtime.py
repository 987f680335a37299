"""The shared runtime: typed jobs, the worker pool's re-queueing, the stage tables in the
docs, and the CPU text workers that hold only a text encoder (the stages' declarations and
how the runtime holds stages to them: tests/test_stage_declarations.py)."""

from __future__ import annotations

from pathlib import Path

import torch
from helpers import SETTINGS

from mace_core.concepts import Concept, ConceptType
from mace_core.text_stats import concept_text_stats
from mace_ray.audit.stages import AUDIT_STAGES
from mace_ray.engine.backend import LocalBackend, LocalRef
from mace_ray.engine.pool import WorkerPool
from mace_ray.engine.resources import Resources
from mace_ray.engine.stages import stage_table
from mace_ray.erase import artefacts
from mace_ray.erase.jobs import PromptStats, TrainConcepts
from mace_ray.erase.stages import ERASE_STAGES
from mace_ray.eval.stages import EVAL_STAGES

DOG = Concept("dog", ConceptType.OBJECT, "animal")
CAT = Concept("cat", ConceptType.OBJECT, "animal")
COW = Concept("cow", ConceptType.OBJECT, "animal")


def test_typed_jobs_carry_their_arguments_and_shrink():
    job = TrainConcepts([DOG, CAT], label="train[dog+1]")
    assert job.method == "train" and job.args() == ([DOG, CAT],)
    rest = job.without({DOG.slug})
    assert rest is not None and rest.concepts == [CAT] and rest.label == job.label
    assert job.without({DOG.slug, CAT.slug}) is None
    assert PromptStats("k", ["a"], label="x").args() == ("k", ["a"])


class LostNode(Exception):
    pass


class FlakyBackend(LocalBackend):
    """The first call of ``method`` dies like a lost node, after the worker finished
    ``finish_first`` of its concepts."""

    def __init__(self, method: str, finish_first: set[str], finished: set[str]) -> None:
        self.method, self.finish_first, self.finished = method, finish_first, finished
        self.failed = False

    def call(self, handle, method, *args, task_name=None):
        if method == self.method and not self.failed:
            self.failed = True
            self.finished |= self.finish_first
            return LocalRef(error=LostNode("node died"))
        return super().call(handle, method, *args, task_name=task_name)

    def is_infrastructure_error(self, exc: BaseException) -> bool:
        return isinstance(exc, LostNode)


class Trainer:
    calls: list[list[str]] = []

    def __init__(self, spec, name):
        self.name = name

    def setup(self):
        return {"worker": self.name}

    def train(self, concepts):
        Trainer.calls.append([c.slug for c in concepts])
        return [c.slug for c in concepts]


def test_pool_requeues_only_the_concepts_a_lost_worker_did_not_finish():
    finished: set[str] = set()
    backend = FlakyBackend("train", {DOG.slug}, finished)
    pool = WorkerPool(backend, Trainer, None, Resources(cpus=0), 1, "s", "t", "run")
    done: list[tuple[list[str], object]] = []
    Trainer.calls = []
    job = TrainConcepts(
        [DOG, CAT, COW], label="b", on_done=lambda j, r: done.append(([c.slug for c in j.concepts], r))
    )
    pool.run([job], finished=lambda: set(finished))
    # The dog reached its marker before the node died: reported done, not trained again.
    assert Trainer.calls == [[CAT.slug, COW.slug]]
    assert done == [([DOG.slug], None), ([CAT.slug, COW.slug], [CAT.slug, COW.slug])]
    assert pool.replaced == 1 and pool.requeued_concepts == 3


def test_architecture_doc_shows_the_declared_stages():
    doc = (Path(__file__).parent.parent / "docs" / "ARCHITECTURE.md").read_text()
    assert stage_table(ERASE_STAGES) in doc
    assert stage_table(EVAL_STAGES) in doc
    assert stage_table(AUDIT_STAGES) in doc


def test_text_worker_holds_only_the_text_encoder(tmp_path, encoder):
    from mace_ray.erase.spec import RunSpec
    from mace_ray.erase.text_worker import TextWorker

    spec = RunSpec(run_id="r1", model="tiny", output=str(tmp_path), settings=SETTINGS, prior_key="k")
    w = TextWorker(spec, "t0")
    assert w.setup()["worker"] == "t0"
    assert not any(isinstance(v, torch.nn.Module) and hasattr(v, "conv_in") for v in vars(w).values())
    assert not hasattr(w, "pipe")
    assert w.text_stats([DOG]) == 1 and w.text_stats([DOG]) == 0  # written once, then reused
    stored = artefacts.read_text_stats(w.storage, w.layout, DOG.slug)
    expect = concept_text_stats(encoder, DOG, SETTINGS.prompts_per_concept)  # the pipeline's encoder
    assert torch.equal(stored.mapping.X, expect.mapping.X) and torch.equal(stored.fusion.C, expect.fusion.C)
