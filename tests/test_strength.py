"""Erasure strength of the default settings on the tiny model (celebrities, no --retain).

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

from mace_core.checkpoints import read_erasure
from mace_core.concepts import ConceptType, read_concept_file
from mace_core.erasure_report import KVProjection, concept_drifts
from mace_core.models import get_attn2_weights
from mace_core.settings import DataSettings, EraseSettings, MaskSettings, TrainSettings
from mace_ray.erase.driver import run_erase
from mace_ray.erase.request import EraseRequest

ROOT = Path(__file__).resolve().parents[1]
CELEBRITIES = read_concept_file(ROOT / "jobs/celebrities/erase.txt", ConceptType.CELEBRITY).concepts
BYSTANDERS = read_concept_file(ROOT / "jobs/celebrities/retain.txt", ConceptType.CELEBRITY).concepts[:5]
DEFAULTS = EraseSettings(
    data=DataSettings(images_per_concept=2, inference_steps=3), masks=MaskSettings(masker="whole-image")
)


def erase(
    n: int, train_steps: int | None, tmp: Path, tiny_pipe, encoder
) -> tuple[dict, dict[str, float | None]]:
    cfile = tmp / "concepts.txt"
    cfile.write_text("".join(f"{c.text} | celebrity\n" for c in CELEBRITIES[:n]))
    settings = replace(DEFAULTS, train=TrainSettings(steps=train_steps))
    req = EraseRequest(
        concept_file=str(cfile), model="tiny", output=str(tmp / "out"), settings=settings, executor="local"
    )
    rep = run_erase(req)
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
