"""A closed-form-only erase (``--stages cfr``) against UCE's closed form, same inputs, one run.

SD 1.x shapes with random weights: a CLIP ViT-L/14-shaped text encoder (12 layers, d = 768,
77 positions, the real CLIP tokenizer) and the 32 attn2 to_k / to_v projections of SD v1.4.
Both methods erase the same concepts (the first --concepts lines of jobs/celebrities/erase.txt)
toward the same anchors and preserve the same prior (the built-in captions, encoded once and
timed apart: MACE caches it per model, ``mace-ray cache-prior``). Each timing includes the
text encoding of the method's prompts.

- MACE CFR (Eq. 1-2, mace_core): the concept in its type's prompt templates and each anchor
  twin, tokens aligned, one d x d matrix M solved in float64, W' = W M for every projection.
  Timed with the paper's 30 templates and with 1 (the same text work as UCE).
- UCE (Gandikota et al., "Unified Concept Editing in Diffusion Models", WACV 2024, Eq. 4 as
  the paper gives it; our own code): per projection,
  W = (sum_i v*_i c_i^T + lam sum_j W c_j c_j^T)(sum_i c_i c_i^T + lam sum_j c_j c_j^T + eps I)^-1
  with c_i the token states of the concept text, v*_i = W c*_i those of its anchor at the
  same positions (aligned as in CFR), c_j the prior's token states.

Usage: python benchmarks/cfr_vs_uce.py [--concepts 100] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

# benchmarks/ is on the path when this runs as a script: the SD v1.4 shapes are shared.
from closed_forms import D, machine, sd14_projections, write_result

from mace_core.alignment import align_tokens
from mace_core.cfr import Preservation, apply_cfr, cfr_matrix
from mace_core.clip_text import CLIP_VOCAB, clip_tokenizer
from mace_core.closed_form_weights import resolve_weights
from mace_core.concepts import ConceptType, read_concept_file
from mace_core.families.stable_diffusion import TextEncoder
from mace_core.prompts import prompt_pairs
from mace_core.settings import ClosedFormSettings
from mace_core.text_stats import (
    MappingStats,
    default_captions_path,
    mapping_stats,
    prompt_second_moment,
    read_captions,
)

ROOT = Path(__file__).resolve().parent.parent


def clip_l_text_encoder() -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    config = CLIPTextConfig(
        hidden_size=D, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, **CLIP_VOCAB
    )
    return CLIPTextModel(config).eval()


def mace_cfr(encoder: TextEncoder, concepts, prior, W, n_prompts: int) -> dict[str, torch.Tensor]:
    """The closed form of a ``--stages cfr`` run: per-concept statistics of the aligned
    prompt pairs (Eq. 1), M (Eq. 2), W' = W M."""
    total: MappingStats | None = None
    for c in concepts:
        m = mapping_stats(encoder, prompt_pairs(c, n_prompts))
        total = m if total is None else total + m
    assert total is not None
    weights = resolve_weights(ClosedFormSettings(), ConceptType.CELEBRITY, len(concepts), total.n, 0)
    M, _ = cfr_matrix(total, weights, Preservation(prior=prior))
    return apply_cfr(W, M)


@torch.no_grad()
def uce(
    encoder: TextEncoder, concepts, prior, W, lam: float = 1.0, eps: float = 1e-4
) -> dict[str, torch.Tensor]:
    """UCE's closed form, solved for each projection as the paper states it."""
    texts = [c.text for c in concepts]
    anchors = [c.anchor for c in concepts]
    states = encoder.encode(texts + anchors).double()
    n = len(concepts)
    c_rows, a_rows = [], []
    for i in range(n):
        al = align_tokens(encoder.ids(texts[i]), encoder.ids(anchors[i]), encoder.max_length)
        c_rows.append(states[i, al.concept_positions])
        a_rows.append(states[n + i, al.anchor_positions])
    C, A = torch.cat(c_rows), torch.cat(a_rows)  # (tokens, d): c_i and c*_i
    lam_p = lam * prior.C / prior.n * C.shape[0]  # the prior on the edit terms' per-token scale
    eye = torch.eye(D, dtype=torch.float64)
    out = {}
    for key, w in W.items():
        w = w.double()
        lhs = (w @ A.T) @ C + w @ lam_p  # sum_i v*_i c_i^T + lam sum_j W c_j c_j^T
        rhs = C.T @ C + lam_p + eps * eye
        out[key] = torch.linalg.solve(rhs, lhs.T).T.float()  # rhs is symmetric
    return out


def timed(fn, *args, **kw):
    t = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concepts", type=int, default=100)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    concepts = read_concept_file(str(ROOT / "jobs" / "celebrities" / "erase.txt"), ConceptType.CELEBRITY)
    concepts = concepts.concepts[: args.concepts]
    torch.manual_seed(1)
    W = sd14_projections()
    encoder = TextEncoder(clip_tokenizer(), clip_l_text_encoder(), torch.device("cpu"))
    captions = read_captions(default_captions_path())
    prior, prior_s = timed(prompt_second_moment, encoder, captions)
    res: dict[str, object] = {
        "machine": machine(),
        "torch": torch.__version__,
        "concepts": len(concepts),
        "shapes": "SD v1.4: CLIP ViT-L/14 text encoder (random), 32 attn2 to_k/to_v projections",
        "prior_captions": len(captions),
        "prior_encoding_s": round(prior_s, 2),
    }
    _, uce_s = timed(uce, encoder, concepts, prior, W)
    _, mace1_s = timed(mace_cfr, encoder, concepts, prior, W, 1)
    _, mace30_s = timed(mace_cfr, encoder, concepts, prior, W, 30)
    res.update(
        uce_s=round(uce_s, 2),
        mace_cfr_1_template_s=round(mace1_s, 2),
        mace_cfr_30_templates_s=round(mace30_s, 2),
        mace_cfr_1_template_vs_uce=round(mace1_s / uce_s, 2),
        mace_cfr_30_templates_vs_uce=round(mace30_s / uce_s, 2),
    )
    write_result(res, args.out, f"cfr_vs_uce_cpu_{len(concepts)}.json", indent=2)


if __name__ == "__main__":
    main()
