"""The concept worker's two halves: training data before CFR, LoRAs after."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import SETTINGS

from mace_core.concepts import Concept, ConceptType
from mace_ray.erase.concept_worker import ConceptWorker
from mace_ray.erase.spec import RunSpec


def test_data_before_cfr_then_training_reuses_it(tmp_path):
    spec = RunSpec(run_id="r1", model="tiny", output=str(tmp_path), settings=SETTINGS, prior_key="k")
    w = ConceptWorker(spec, "w0")
    w.setup()
    c = Concept("Bill Clinton", ConceptType.CELEBRITY, "a person")
    root = tmp_path / "runs" / "r1" / "concepts" / c.slug
    data = tmp_path / spec.data_layout(c).root  # shared by runs: data/<key>/

    assert w.prepare_data([c]) == [c.slug]  # needs no CFR result
    assert (data / "data.json").is_file() and not (root / "DONE").exists()
    images = sorted((data / "images").iterdir()) + sorted((data / "masks").iterdir())
    assert len(images) == 2 * SETTINGS.data.images_per_concept
    stamps = {p: p.stat().st_mtime_ns for p in images}
    assert w.prepare_data([c]) == []  # already there: nothing regenerated

    with pytest.raises(RuntimeError, match="set_cfr"):
        w.train([c])
    w.set_cfr(torch.eye(32, dtype=torch.float64))
    assert w.train([c]) == [c.slug]
    assert (root / "DONE").is_file()
    assert {p: p.stat().st_mtime_ns for p in images} == stamps  # training used the stored data
    notes = json.loads((root / "notes.json").read_text())
    assert set(notes["seconds"]) == {"generate", "mask", "train"}
    assert notes["mask_source"] == "whole-image" and notes["where"]["worker"] == "w0"
    assert w.train([c]) == [] and w.prepare_data([c]) == []  # DONE: nothing to do
