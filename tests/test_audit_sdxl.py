"""The audit on SDXL: its embedding attacks go through both text encoders (a learned token
gets an input embedding in each, the pooled embedding included), and `mace-ray audit` runs
end to end on an erased tiny SDXL run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import tiny_settings
from typer.testing import CliRunner

from mace_core.audit.concepts import AuditConcept
from mace_core.audit.context import AuditModels
from mace_core.audit.embedding import PLACEHOLDER, AttackPrompt
from mace_core.concepts import Concept, ConceptType
from mace_core.families.sdxl import build_tiny_pipeline
from mace_core.sealed import open_sealed

CPU = torch.device("cpu")
AIRPLANE = AuditConcept(Concept("airplane", ConceptType.OBJECT, "sky"))
# Every attack and images, at the smallest settings that still take steps.
FAST = [
    "--inversion-steps", "2", "--inversion-images", "2", "--soft-prompt-steps", "2",
    "--indirect-misspellings", "1", "--images", "1", "--inference-steps", "2", "--clip", "tiny",
]  # fmt: skip


@pytest.fixture(scope="module")
def unerased() -> AuditModels:
    """The tiny SDXL pipeline audited against itself: nothing was erased."""
    return AuditModels.of(build_tiny_pipeline(0), build_tiny_pipeline(0), CPU)


def test_a_learned_token_acts_through_both_text_encoders(unerased):
    text = unerased.erased.text
    meter = unerased.meter(AIRPLANE)
    own, anchor = text.token_embeddings("airplane"), text.token_embeddings("sky")
    assert [e.shape for e in own] == [(1, 32), (1, 32)]  # one embedding per encoder
    # The concept's own embeddings in both encoders are the concept; in one of them only,
    # part of it: each encoder carries half of the cross-attention context.
    assert meter.measure(AttackPrompt(PLACEHOLDER, own)).leak == 1.0
    first = meter.measure(AttackPrompt(PLACEHOLDER, (own[0], anchor[1]))).leak
    second = meter.measure(AttackPrompt(PLACEHOLDER, (anchor[0], own[1]))).leak
    assert 0 < first < 1 and 0 < second < 1, (first, second)
    # The whole conditioning follows, the pooled embedding of the second encoder included.
    templates = ["a photo of {}", "{} in the sky"]
    injected = text.conditioning(templates, AttackPrompt(PLACEHOLDER, own))
    plain = text.conditioning(templates, AttackPrompt("airplane"))
    assert all(torch.equal(injected[k], plain[k]) for k in ("context", "text_embeds"))
    # Gradients reach both encoders' embeddings.
    start = tuple(e.clone().requires_grad_(True) for e in anchor)
    meter.loss(AttackPrompt(PLACEHOLDER, start)).backward()
    assert all(e.grad is not None and float(e.grad.norm()) > 0 for e in start)
    with pytest.raises(ValueError, match="2 text encoders"):
        meter.measure(AttackPrompt(PLACEHOLDER, own[:1]))


@pytest.fixture(scope="module")
def erased_sdxl_run(tmp_path_factory) -> Path:
    """'airplane' erased from the tiny SDXL pipeline (the tests' cheap erase settings)."""
    from mace_ray.erase.driver import run_erase
    from mace_ray.erase.request import EraseRequest

    tmp = tmp_path_factory.mktemp("sdxl-erase")
    build_tiny_pipeline().save_pretrained(tmp / "tiny-sdxl", safe_serialization=True)
    (tmp / "concepts.txt").write_text("airplane | object | sky\n")
    rep = run_erase(
        EraseRequest(
            concept_file=str(tmp / "concepts.txt"),
            model=str(tmp / "tiny-sdxl"),
            output=str(tmp / "out"),
            settings=tiny_settings(train_steps=2, inference_steps=2),
            executor="local",
        )
    )
    return Path(rep["output"]["root"])


def test_audit_of_an_erased_sdxl_run(erased_sdxl_run, tmp_path):
    from mace_ray.cli.main import app

    r = CliRunner().invoke(
        app,
        ["audit", str(erased_sdxl_run), "--executor", "local", "--output", str(tmp_path / "out"), *FAST],
    )
    assert r.exit_code == 0, r.stderr
    root = Path(json.loads(r.stdout.strip().splitlines()[-1])["root"])
    rep = json.loads((root / "report.json").read_text())
    assert rep["status"] == "complete" and rep["attacks"] == ["indirect", "inversion", "soft-prompt"]
    (entry,) = rep["concepts"]
    assert entry["concept"]["text"] == "airplane" and entry["plain"]["leak"] < 1.0
    inversion = entry["attacks"]["inversion"]
    assert inversion["steps"] == 2 and inversion["details"]["images_from"] == "erase run"
    soft = entry["attacks"]["soft-prompt"]
    assert len(soft["details"]["delta_norm"]) == 2 and soft["leak"] >= entry["plain"]["leak"]
    # The learned token is stored with an embedding for each text encoder.
    tensors, meta = open_sealed((root / "jobs" / entry["slug"] / "inversion.safetensors").read_bytes(), "inv")
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {"embeddings": (1, 32), "embeddings_2": (1, 32)}
    assert meta["word"] == PLACEHOLDER
    for what in ("original", "erased", "inversion", "soft-prompt"):
        assert (root / "images" / entry["slug"] / what / "000.png").is_file(), what
