"""``--stages``: closed-form refinement only, and partial runs that the full run takes up."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from helpers import CONCEPTS, SETTINGS, assert_same_erasure, erasure, request

from mace_core.attn2 import get_attn2_weights
from mace_core.cfr import apply_cfr
from mace_core.checkpoints import read_erasure
from mace_core.errors import SettingError
from mace_core.families.sd1 import build_tiny_pipeline
from mace_core.sealed import open_sealed
from mace_core.settings import MaskSettings
from mace_ray.erase.driver import run_erase
from mace_ray.erase.layout import DATA_ROOT
from mace_ray.erase.plan import plan_stages


def test_a_stage_list_brings_what_it_needs():
    method, stages = plan_stages("train")
    assert method == "mace"
    assert [s.name for s in stages] == ["text_statistics", "workers_start", "cfr", "train"]
    assert [s.name for s in plan_stages("data")[1]] == ["workers_start", "data"]
    assert plan_stages("all")[1][-1].name == "finish"
    method, stages = plan_stages(" CFR ")
    assert (
        method == "cfr" and "train" not in [s.name for s in stages] and "data" not in [s.name for s in stages]
    )
    with pytest.raises(SettingError, match=r"--stages: unknown stage 'trian' \(valid: all, text_statistics"):
        plan_stages("data,trian")


def test_closed_form_only_run_writes_the_refined_weights(tmp_path, tiny_model_folder, monkeypatch):
    """`--method cfr` makes no image, mask or LoRA, and loads no masker: here the model is a
    folder (not `tiny`), so the default masker would be Grounding DINO and SAM from the hub,
    which this offline machine does not have; a run that loaded them would fail."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfile = tmp_path / "c.txt"
    cfile.write_text(CONCEPTS)
    out = tmp_path / "out"
    req = dataclasses.replace(
        request(cfile, out, executor="local", method="cfr"),
        model=str(tiny_model_folder),
        settings=dataclasses.replace(SETTINGS, masks=MaskSettings()),  # grounded-sam, hub defaults
    )
    rep = run_erase(req)
    root = Path(rep["output"]["root"])
    assert rep["status"] == "complete" and rep["method"] == "cfr"
    # Nothing of the LoRA stage, where it would be: images and masks live under
    # <output>/data/<key>/ (shared by runs, mace_ray/erase/layout.py), LoRAs in the run.
    assert not (out / DATA_ROOT).exists(), sorted(p.name for p in out.rglob("*.png"))
    assert not list(out.rglob("*.png")) and not list(root.glob("concepts/*/lora.safetensors"))
    assert not json.loads((root / "refs.json").read_text())["data"]
    # The result is W' = W M exactly, and the CFR file says the same.
    M = open_sealed((root / "cfr" / "M.safetensors").read_bytes(), "M")[0]["M"].double()
    expect = apply_cfr(get_attn2_weights(build_tiny_pipeline().unet), M)
    got = erasure(root)
    assert_same_erasure(got, expect, atol=0)
    cfr = read_erasure((root / "final" / "cfr.safetensors").read_bytes())[0]
    assert all(torch.equal(cfr[k], got[k]) for k in got)
    report = json.loads((root / "report.json").read_text())
    first = report["concepts"][0]["erasure"]
    assert first["residual"] == pytest.approx(first["residual_cfr"]) and first["lora_relative_norm"] is None
    assert "closed-form-only" in first["attention_mass_missing"]
    # Another result, so another run than the method's on the same inputs.
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["method"] == "cfr" and "fusion" not in report["weights"]


def test_partial_run_then_full_run_reuses_its_images(tmp_path, reference_erasure, caplog):
    cfile = tmp_path / "c.txt"
    cfile.write_text(CONCEPTS)
    out = tmp_path / "out"
    with caplog.at_level("INFO", logger="mace_ray"):
        part = run_erase(
            request(cfile, out, executor="local", concepts_per_batch=2, stages="text_statistics,data")
        )
    # Its closing line: no concept is trained before the train stage runs.
    assert "partial in" in caplog.text and "concepts: 0 trained, 0 reused" in caplog.text, caplog.text
    root = Path(part["output"]["root"])
    assert part["status"] == "partial" and part["stages"] == ["text_statistics", "workers_start", "data"]
    assert json.loads((root / "manifest.json").read_text())["status"] == "partial"
    images = sorted(out.glob("data/*/images/*.png"))
    assert len(images) == 4 * 2 and not list(root.glob("concepts/*/DONE"))
    stamps = {p: p.stat().st_mtime_ns for p in images}
    full = run_erase(request(cfile, out, executor="local", concepts_per_batch=2))
    assert full["run_id"] == part["run_id"] and full["status"] == "complete"
    assert {p: p.stat().st_mtime_ns for p in images} == stamps  # not one image made again
    assert_same_erasure(erasure(root), reference_erasure)
