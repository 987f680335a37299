"""The erasure report's figures against models whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

from mace_core.alignment import align_tokens
from mace_core.attn2 import attn2_projections
from mace_core.clip_text import TINY_CLIP_TEXT
from mace_core.concepts import Concept, ConceptType
from mace_core.erasure_report import (
    KVProjection,
    attention_mass,
    kv_drift,
    kv_gaps,
    lora_relative_norm,
    summarize,
)
from mace_core.families.stable_diffusion import TextEncoder
from mace_core.lora import LoraFactors
from mace_core.prompts import heldout_captions, heldout_pairs

CPU = torch.device("cpu")
CLINTON = Concept("Bill Clinton", ConceptType.CELEBRITY, "a man")


@pytest.fixture(scope="module")
def wide_encoder(tokenizer):
    """A text encoder wider than the number of held-out aligned positions of a concept, so
    that a linear map taking every concept state exactly onto its anchor's exists."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        cfg = dict(TINY_CLIP_TEXT, hidden_size=768, intermediate_size=64, num_hidden_layers=1)
        model = CLIPTextModel(CLIPTextConfig(**cfg)).eval()
    return TextEncoder(tokenizer, model, CPU)


def aligned_states(encoder: TextEncoder, concept: Concept) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = heldout_pairs(concept)
    ef, eg = encoder.encode([p.concept for p in pairs]), encoder.encode([p.anchor for p in pairs])
    rows_f, rows_g = [], []
    for pair, f, g in zip(pairs, ef, eg, strict=True):
        al = align_tokens(encoder.ids(pair.concept), encoder.ids(pair.anchor), encoder.max_length)
        rows_f.append(f[al.concept_positions])
        rows_g.append(g[al.anchor_positions])
    return torch.cat(rows_f).double(), torch.cat(rows_g).double()


def test_residual_is_one_unchanged_zero_for_an_exact_map_and_quadratic_between(wide_encoder):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(48, 768, generator=g, dtype=torch.float64)
    Ef, Eg = aligned_states(wide_encoder, CLINTON)
    assert Ef.shape[0] < 768
    # W_exact Ef^T = W Eg^T: every aligned concept state lands on its anchor's keys/values.
    W_exact = W @ Eg.T @ torch.linalg.pinv(Ef.T)
    assert torch.allclose(W_exact @ Ef.T, W @ Eg.T, atol=1e-6 * float((W @ Eg.T).abs().max()))
    original = KVProjection({"p.attn2.to_k.weight": W}, CPU)

    def model(w: torch.Tensor) -> KVProjection:
        return KVProjection({"p.attn2.to_k.weight": w}, CPU)

    gap, res = kv_gaps(
        wide_encoder,
        CLINTON,
        original,
        {"same": original, "exact": model(W_exact), "half": model((W + W_exact) / 2)},
    )
    assert gap > 0
    assert res["same"] == pytest.approx(1.0, abs=1e-9)
    assert res["exact"] < 1e-4
    # Half way in weight space leaves half the gap, a quarter of its square.
    assert res["half"] == pytest.approx(0.25, abs=1e-3)


def test_residual_is_none_when_concept_and_anchor_encode_alike(encoder):
    same = Concept("a man", ConceptType.CELEBRITY, "a man")
    W = {"p.attn2.to_k.weight": torch.randn(8, encoder.dim)}
    gap, res = kv_gaps(encoder, same, KVProjection(W, CPU), {"new": KVProjection(W, CPU)})
    assert gap == 0 and res["new"] is None


def test_drift_is_the_relative_squared_change(encoder):
    W = {
        "p.attn2.to_k.weight": torch.randn(8, encoder.dim),
        "p.attn2.to_v.weight": torch.randn(8, encoder.dim),
    }
    original = KVProjection(W, CPU)
    captions = heldout_captions()[:5]
    assert kv_drift(encoder, captions, original, original) == 0
    scaled = KVProjection({k: 1.1 * v for k, v in W.items()}, CPU)
    assert kv_drift(encoder, captions, original, scaled) == pytest.approx(0.01, rel=1e-4)
    assert kv_drift(encoder, [], original, scaled) is None


def test_lora_relative_norm():
    W = {"k": torch.ones(4, 9)}  # ||W||_F = 6
    lora = LoraFactors({"k": (torch.full((1, 9), 0.5), torch.full((4, 1), 0.2))})  # ||BA|| = 0.6
    assert lora_relative_norm(lora, W) == pytest.approx(0.1)


def test_attention_mass_of_zero_keys_is_the_token_share(tiny_pipe, encoder):
    """Keys all zero: every query spreads its attention evenly over the 77 tokens, so the
    concept's share is its token count over 77, inside any mask."""
    original = {k: m.weight.detach().clone() for k, m in attn2_projections(tiny_pipe.unet).items()}
    flat = {
        k: (torch.zeros_like(w) if k.endswith("to_k") or "to_k." in k else w) for k, w in original.items()
    }
    images = np.random.default_rng(0).integers(0, 255, size=(2, 32, 32, 3), dtype=np.uint8)
    masks = np.zeros((2, 32, 32), dtype=bool)
    masks[:, 8:24, 8:24] = True
    out = attention_mass(
        tiny_pipe.unet, tiny_pipe.vae, tiny_pipe.scheduler, encoder, CLINTON, images, masks,
        {"original": original, "flat": flat}, CPU,
    )  # fmt: skip
    n_tok = len(encoder.ids(CLINTON.text)) - 2
    assert out["flat"] == pytest.approx(n_tok / 77, rel=1e-4)
    assert 0 < out["original"] < 1 and out["original"] != pytest.approx(out["flat"], rel=1e-3)
    # The UNet is left with its own weights.
    for k, m in attn2_projections(tiny_pipe.unet).items():
        assert torch.equal(m.weight, original[k])


def test_summary_pools_by_gap_and_names_concepts_above_the_limit():
    per = {
        "a": {"residual": 0.5, "residual_cfr": 0.6, "gap": 3.0, "lora_relative_norm": 0.02},
        "b": {"residual": 0.1, "residual_cfr": 0.2, "gap": 1.0, "lora_relative_norm": 0.04},
    }
    s = summarize(per, {"prior_drift": 0.01}, max_residual=0.3)
    assert s["residual"]["pooled"] == pytest.approx((0.5 * 3 + 0.1) / 4)
    assert s["residual"]["mean"] == pytest.approx(0.3) and s["residual"]["max"] == 0.5
    assert s["above_max_residual"] == ["a"] and s["prior_drift"] == 0.01
    assert s["retain_drift"] is None and "retain" in s["retain_drift_missing"]
    assert summarize(per, {}, None)["above_max_residual"] == []


def test_heldout_prompts_are_disjoint_from_everything_trained_on():
    from importlib import resources

    from mace_core.prompts import heldout_templates, templates

    for t in ConceptType:
        held, train = set(heldout_templates(t)), set(templates(t))
        assert len(held) >= 8 and not held & train, t
    own = resources.files("mace_core").joinpath("data/captions.txt").read_text("utf-8").splitlines()
    captions = set(heldout_captions())
    assert len(captions) >= 50 and not captions & {c.strip() for c in own}
