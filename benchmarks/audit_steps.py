"""Cost of the audit's attacks per step, on SD 1.x-shaped random weights.

The three attacks of ``mace-ray audit`` on an SD 1.x-shaped pipeline with random weights
(UNet 860 M, CLIP ViT-L/14 text encoder, VAE; ``masking_datagen.real_pipeline``), on this
machine's device (the CPU here): seconds per step of concept inversion (a UNet forward and
backward for the learned token, plus the teacher's UNet forward, at ``--resolution``), of the
soft-prompt search (a text-encoder forward and backward over its training templates) and
of one indirect prompt (a text-encoder forward over the held-out templates), each step
including the leak measure on the held-out templates that every step ends with.

Timing only: the weights are random, the "erased" model is the original itself and the
original model's images are random pixels (generating them at 512 px on a CPU would take
longer than the attacks). Steps are timed from the attacks' own progress calls; the first
step of each attack is a warm-up and is left out.

Usage: python benchmarks/audit_steps.py [--steps 3] [--resolution 512] [--batch 1] [--out DIR]
Writes <out>/audit_steps_<device>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

# benchmarks/ is on the path when this runs as a script: the SD 1.x-shaped builder is shared.
from masking_datagen import real_pipeline

from mace_core.audit.attacks import AttackSettings
from mace_core.audit.concepts import AuditConcept
from mace_core.audit.context import AuditModels
from mace_core.audit.run import run_attack
from mace_core.audit.settings import AuditSettings
from mace_core.concepts import Concept, ConceptType
from mace_core.models import pick_device

ROOT = Path(__file__).resolve().parents[1]
CONCEPT = AuditConcept(Concept("Van Gogh", ConceptType.STYLE, "art"), ("Vincent van Gogh",))


def step_times(models: AuditModels, attack: str, settings: AuditSettings, images) -> dict[str, Any]:
    """Seconds of each step of ``attack`` (from its progress calls), the first left out."""
    stamps: list[float] = []

    def progress(what: str, done: int, total: int) -> None:
        stamps.append(time.perf_counter())

    t0 = time.perf_counter()
    result = run_attack(models, CONCEPT, attack, settings, progress=progress, original_images=images)
    total = time.perf_counter() - t0
    steps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return {
        "steps": result.steps,
        "seconds_per_step": round(sum(steps) / len(steps), 4) if steps else None,
        "seconds_per_step_each": [round(s, 4) for s in steps],
        "first_step_s": round(stamps[0] - t0, 4) if stamps else None,
        "total_s": round(total, 3),
        "strength": result.strength,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per attack (plus one warm-up)")
    ap.add_argument("--resolution", type=int, default=512, help="image size of the inversion's latents")
    ap.add_argument("--batch", type=int, default=1, help="inversion: noised images per step")
    ap.add_argument("--templates", type=int, default=8, help="soft-prompt: training templates per step")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    device = pick_device(args.device)
    t = time.perf_counter()
    pipe = real_pipeline(device)
    build_s = time.perf_counter() - t
    # Timing only: the original is its own "erased" model (the same computation per step).
    models = AuditModels.of(pipe, pipe, device)
    rng = np.random.default_rng(0)

    def images(n: int) -> np.ndarray:
        return rng.integers(0, 256, (n, args.resolution, args.resolution, 3), dtype=np.uint8)

    n = args.steps + 1
    base = AttackSettings()
    attacks = dataclasses.replace(
        base,
        indirect=dataclasses.replace(base.indirect, misspellings=n),
        inversion=dataclasses.replace(base.inversion, steps=n, batch=args.batch, images=2),
        soft_prompt=dataclasses.replace(base.soft_prompt, steps=n, templates=args.templates),
    )
    settings = AuditSettings(images=0, attacks=attacks)
    out: dict[str, Any] = {
        "what": "seconds per attack step, SD 1.x-shaped random weights (timing only)",
        "device": str(device),
        "machine": platform.processor() or platform.machine(),
        "cpus": torch.get_num_threads(),
        "torch": torch.__version__,
        "resolution": args.resolution,
        "inversion_batch": args.batch,
        "soft_prompt_templates": args.templates,
        "build_s": round(build_s, 2),
        "attacks": {},
    }
    for attack in ("indirect", "soft-prompt", "inversion"):
        out["attacks"][attack] = step_times(models, attack, settings, images)
        print(
            attack,
            json.dumps({k: v for k, v in out["attacks"][attack].items() if k != "strength"}),
            flush=True,
        )
    out["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"audit_steps_{device.type}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
