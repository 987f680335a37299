"""Erasure strength of the default settings on the tiny model and on two tiny SDXL builds
(celebrities, no --retain).

Default runs (the paper's per-type weights for N, Gaussian LoRA init, 30 prompts per
concept), only the data made small: the tiny model's images are noise either way, and the
closed forms carry the erasure. The figures are the run's own erasure report; bystanders
are celebrities the run never names.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mace_core.attn2 import get_attn2_weights
from mace_core.checkpoints import read_erasure
from mace_core.concepts import ConceptType, read_concept_file
from mace_core.erasure_report import KVProjection, concept_drifts
from mace_core.settings import DataSettings, EraseSettings, MaskSettings, TrainSettings
from mace_ray.erase.driver import run_erase
from mace_ray.erase.request import EraseRequest

ROOT = Path(__file__).resolve().parents[1]
CELEBRITIES = read_concept_file(ROOT / "jobs/celebrities/erase.txt", ConceptType.CELEBRITY).concepts
BYSTANDERS = read_concept_file(ROOT / "jobs/celebrities/retain.txt", ConceptType.CELEBRITY).concepts[:5]
DEFAULTS = EraseSettings(
    data=DataSettings(images_per_concept=2, inference_steps=3), masks=MaskSettings(masker="whole-image")
)


def erase_model(model: str, n: int, train_steps: int | None, tmp: Path) -> dict:
    """A default run erasing the first ``n`` celebrities from ``model``: its report."""
    cfile = tmp / "concepts.txt"
    cfile.write_text("".join(f"{c.text} | celebrity\n" for c in CELEBRITIES[:n]))
    settings = replace(DEFAULTS, train=TrainSettings(steps=train_steps))
    req = EraseRequest(
        concept_file=str(cfile), model=model, output=str(tmp / "out"), settings=settings, executor="local"
    )
    return run_erase(req)


def erase(
    n: int, train_steps: int | None, tmp: Path, tiny_pipe, encoder
) -> tuple[dict, dict[str, float | None]]:
    rep = erase_model("tiny", n, train_steps, tmp)
    fused, _ = read_erasure((Path(rep["output"]["root"]) / "final" / "erasure.safetensors").read_bytes())
    original = KVProjection(get_attn2_weights(tiny_pipe.unet), torch.device("cpu"))
    drifts = concept_drifts(encoder, BYSTANDERS, original, KVProjection(fused, torch.device("cpu")))
    return rep, drifts


# (concepts, LoRA steps (None: the type's 50), residual on training prompts, on held-out
# prompts, bystander drift mean and max). Measured (benchmarks/results/strength_tiny_cpu.json):
# 0.32 / 0.41 / 0.008 for 2; 0.37 / 0.43 / 0.037 (max 0.054) for 20; the old defaults gave
# 0.43 / 0.57 / 0.004 for 2 and 0.62 / 0.68 / 0.004 for 20. The bystander target of
# 0.025 holds for 2 concepts but not for 20 on this 32-wide model (README, "Erasure strength").
# 20 concepts train 10 steps to keep the suite short: on random images the LoRA moves the
# residual by < 0.01; the 2-concept case checks the default LoRA's size.
CASES = [(2, None, 0.40, 0.45, 0.025, 0.025), (20, 10, 0.42, 0.47, 0.05, 0.08)]


@pytest.mark.parametrize(("n", "steps", "max_train", "max_heldout", "max_by_mean", "max_by"), CASES)
def test_default_celebrity_runs_erase_as_strongly_as_the_papers_weights(
    n, steps, max_train, max_heldout, max_by_mean, max_by, tmp_path, tiny_pipe, encoder
):
    rep, bystanders = erase(n, steps, tmp_path, tiny_pipe, encoder)
    e = rep["erasure"]
    assert rep["weights_profile"]["type"] == "celebrity" and rep["weights_profile"]["concepts"] == n
    assert e["residual_train"]["pooled"] <= max_train, e["residual_train"]
    assert e["residual"]["pooled"] <= max_heldout, e["residual"]
    # CFR alone already erases on held-out prompts; the fusion keeps most of it.
    assert e["residual_cfr"]["pooled"] < 0.5
    assert e["prior_drift"] <= 0.035
    drifts = list(bystanders.values())
    assert all(v is not None for v in drifts)
    assert sum(drifts) / len(drifts) <= max_by_mean and max(drifts) <= max_by, bystanders
    # The LoRAs lowered the concepts' attention inside their masks.
    assert e["attention_mass"]["erased"] < e["attention_mass"]["original"]
    if steps is None:  # the default training: every LoRA moves its projections by >= 1.5%
        assert all(c["erasure"]["lora_relative_norm"] >= 0.015 for c in rep["concepts"])


# SDXL, on two differently built tiny pipelines: the family's tiny model (context 32 + 32,
# seed 0) and a wider one from another seed (32 + 64, seed 1); the defaults, LoRAs trained
# 10 steps to keep it cheap. Measured: 0.371 and 0.255 pooled (drift 0.0018 / 0.0021); with
# the default 50 steps 0.418 and 0.321, and every SDXL build at 64-128 wide, 2 seeds each,
# 0.28-0.42 (benchmarks/results/strength_families_cpu.json: SD 1.x 0.26-0.44 at 32-64).
# A 2048-wide tiny SDXL gives 3.2-4.6, as a 768-wide SD 1.x gives 0.5-1.2: without the LoRA
# term both fuse to ~0.1 (strength_nolora_cpu.json); the LoRA's size relative to random
# weights grows with the width (||BA||/||W|| 0.04 at 32, 0.17 at 768, 0.31 at 2048).
SDXL_BUILDS = [(64, 0), (96, 1)]


@pytest.fixture(scope="module", params=SDXL_BUILDS, ids=lambda b: f"width{b[0]}-seed{b[1]}")
def sdxl_erasure(request, tmp_path_factory) -> tuple[dict, dict[str, float | None]]:
    from mace_core.families.sdxl import build_tiny_pipeline, split_width
    from mace_core.models import load_pipeline, load_prompt_encoder, pipeline_projections

    width, seed = request.param
    tmp = tmp_path_factory.mktemp(f"sdxl{width}")
    build_tiny_pipeline(seed, widths=split_width(width)).save_pretrained(
        tmp / "model", safe_serialization=True
    )
    model = str(tmp / "model")
    rep = erase_model(model, 2, 10, tmp)
    projections = pipeline_projections(load_pipeline(model))
    fused, _ = read_erasure((Path(rep["output"]["root"]) / "final" / "erasure.safetensors").read_bytes())
    cpu = torch.device("cpu")
    original = KVProjection(projections.weights(), cpu)
    erased = KVProjection(projections.from_component_tensors(fused), cpu)
    return rep, concept_drifts(load_prompt_encoder(model, cpu), BYSTANDERS, original, erased)


def test_default_sdxl_celebrity_runs_erase_as_strongly_as_sd1(sdxl_erasure):
    rep, bystanders = sdxl_erasure
    e = rep["erasure"]
    assert rep["weights_profile"]["type"] == "celebrity" and rep["weights_profile"]["concepts"] == 2
    assert e["residual"]["pooled"] <= 0.42, e["residual"]
    assert e["residual_cfr"]["pooled"] < 0.42, e["residual_cfr"]
    assert e["prior_drift"] <= 0.035
    drifts = list(bystanders.values())
    assert all(v is not None for v in drifts) and max(drifts) <= 0.025, bystanders
