"""Time and peak memory of MACE's closed-form stages for many concepts at SD 1.x sizes.

Random data with SD v1.4 shapes: d = 768 text states, the 32 attn2 to_k / to_v
projections of the UNet, rank-1 LoRAs. Measures, in one run:
  - per-concept statistics from token states (E^T E over 30 prompts x 77 tokens),
  - the CFR reduction over all concepts and the solve of M (Eq. 2), W' = W M,
  - streaming every concept's fusion terms into the running sums (Eq. 7), in blocks (one
    GEMM per projection and block, the default) and, on the first --plain-concepts concepts,
    one at a time (block 1, the old stream), and the solve.

Usage: python benchmarks/closed_forms.py [--concepts 1000] [--block 256] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

import torch

from mace_core.cfr import Preservation, apply_cfr, cfr_matrix
from mace_core.closed_form_weights import resolve_weights
from mace_core.concepts import ConceptType
from mace_core.fusion import FusionSums, fuse
from mace_core.lora import LoraFactors
from mace_core.settings import ClosedFormSettings
from mace_core.text_stats import MappingStats, SecondMoment

D = 768
# SD v1.4: 16 cross-attention blocks, output widths by position in the UNet.
WIDTHS = [320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320]
TOKENS = 30 * 77  # 30 prompts of 77 token states per concept


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sd14_projections() -> dict[str, torch.Tensor]:
    """Random weights (scale 0.02, from torch's global RNG) of SD v1.4's 32 attn2 to_k / to_v
    projections: what the closed forms edit."""
    keys = [f"block{i}.attn2.to_{p}.weight" for i in range(16) for p in ("k", "v")]
    return {key: torch.randn(WIDTHS[i // 2], D) * 0.02 for i, key in enumerate(keys)}


def machine() -> str:
    """The CPU and torch's thread count, as a result names the machine it was measured on."""
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def write_result(res: dict[str, object], out: str, name: str, indent: int = 1) -> None:
    """Print a benchmark's result and write it as JSON to ``out/name``."""
    text = json.dumps(res, indent=indent)
    print(text)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concepts", type=int, default=1000)
    ap.add_argument("--stat-samples", type=int, default=10, help="concepts whose statistics are timed")
    ap.add_argument("--block", type=int, default=FusionSums.block, help="concepts per fusion GEMM")
    ap.add_argument("--plain-concepts", type=int, default=200, help="concepts streamed one at a time too")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    torch.manual_seed(0)
    k = args.concepts
    W = sd14_projections()
    rss0 = peak_rss_mb()
    res: dict[str, object] = {
        "machine": machine(),
        "torch": torch.__version__,
        "concepts": k,
        "d": D,
        "projections": len(W),
    }

    # Per-concept statistics from token states (the text-statistics stage's arithmetic).
    E = torch.randn(TOKENS, D)
    t = time.perf_counter()
    for _ in range(args.stat_samples):
        SecondMoment.of(E)
    per_concept = (time.perf_counter() - t) / args.stat_samples
    res["stats_per_concept_s"] = round(per_concept, 4)

    # A pool of statistics, reused with per-concept scaling: the closed forms only see sums.
    pool = [SecondMoment.of(torch.randn(TOKENS, D)) for _ in range(4)]
    prior = SecondMoment.of(torch.randn(20_000, D))

    t = time.perf_counter()
    total = MappingStats.zeros(D)
    for i in range(k):
        C = pool[i % 4]
        total += MappingStats(0.9 * C.C, C.C, C.n)
    res["cfr_reduce_s"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    # The celebrity defaults (the paper's weights for k concepts) with a small explicit ridge:
    # random states are well conditioned, so the ridge floor is never needed here.
    terms = Preservation(prior)
    cfr_w = resolve_weights(ClosedFormSettings(ridge=1e-2), ConceptType.CELEBRITY, k, total.n, 0, True)
    M, _ = cfr_matrix(total, cfr_w, terms)
    refined = apply_cfr(W, M)
    res["cfr_solve_and_apply_s"] = round(time.perf_counter() - t, 3)

    g = torch.Generator().manual_seed(1)
    loras = [
        LoraFactors(
            {
                key: (torch.randn(1, D, generator=g), torch.randn(w.shape[0], 1, generator=g))
                for key, w in W.items()
            }
        )
        for _ in range(4)
    ]
    # The old stream (one concept at a time) on a prefix, for the ratio; then the blocked one.
    m = min(k, args.plain_concepts)
    t = time.perf_counter()
    plain = FusionSums(SecondMoment.zeros(D), block=1)
    for i in range(m):
        plain.add_concept(pool[i % 4], loras[i % 4])
    plain_ms = 1e3 * (time.perf_counter() - t) / m
    t = time.perf_counter()
    sums = FusionSums(SecondMoment.zeros(D), block=args.block)
    for i in range(k):
        sums.add_concept(pool[i % 4], loras[i % 4])
        if i + 1 == m:  # same concepts as the plain stream: the sums must agree
            err = max(
                float((sums.flush().dWC[key] - plain.dWC[key]).abs().max() / plain.dWC[key].abs().max())
                for key in W
            )
    sums.flush()
    res["fusion_block"] = args.block
    res["fusion_stream_s"] = round(time.perf_counter() - t, 3)
    res["fusion_stream_per_concept_ms"] = round(1e3 * float(res["fusion_stream_s"]) / k, 2)
    res["fusion_stream_one_at_a_time_per_concept_ms"] = round(plain_ms, 2)
    res["fusion_stream_speedup"] = round(plain_ms / float(res["fusion_stream_per_concept_ms"]), 1)
    res["fusion_blocked_vs_plain_max_rel_err"] = err
    del plain
    t = time.perf_counter()
    fusion_w = resolve_weights(ClosedFormSettings(ridge=1e-2), ConceptType.CELEBRITY, k, sums.C.n, 0)
    fuse(sums, W, refined, fusion_w, terms)
    res["fusion_solve_s"] = round(time.perf_counter() - t, 3)
    state_bytes = 8 * (sums.C.C.numel() + sum(v.numel() for v in sums.dWC.values()))
    res["fusion_state_MB"] = round(state_bytes / 2**20, 1)
    res["closed_forms_total_s"] = round(
        float(res["cfr_reduce_s"])
        + float(res["cfr_solve_and_apply_s"])
        + float(res["fusion_stream_s"])
        + float(res["fusion_solve_s"]),
        3,
    )
    res["stats_all_concepts_estimate_s"] = round(per_concept * k, 1)
    res["peak_rss_MB"] = round(peak_rss_mb(), 0)
    res["peak_rss_growth_MB"] = round(peak_rss_mb() - rss0, 0)
    write_result(res, args.out, f"closed_forms_cpu_{k}.json")


if __name__ == "__main__":
    main()
