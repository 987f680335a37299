"""Reference way vs fast path of MACE Stage 2 (images, masks, LoRA), in one run, same inputs.

Reference way (as the method is usually run): one concept at a time, models loaded for
every concept, fp32, LoRA trained with batch 1. Fast path (what `mace-ray erase` does):
models loaded once per worker, K concepts per batch (images in one diffusion batch,
LoRAs in one UNet batch with per-sample adapters), and on a GPU fp16 generation and bf16
training (``precision=auto``). Prints seconds per concept for each stage and the ratios.

Sizes: ``tiny`` (the built-in tiny models, CPU or GPU) and ``real`` (SD 1.x-shaped UNet
860 M, CLIP-L, VAE at 512 px, Grounding DINO Swin-T, SAM ViT-H; random weights, GPU only).

Usage: python benchmarks/speed.py [--size tiny|real] [--concepts 8] [--k 4] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mace_core.concept_job import ConceptBatchWorker
from mace_core.concepts import Concept, ConceptType
from mace_core.masking import GroundedSam, load_masker
from mace_core.models import build_tiny_pipeline, get_attn2_weights, pick_device
from mace_core.settings import DataSettings, EraseSettings, MaskSettings, TrainSettings

NAMES = ["Bill Clinton", "Tom Hanks", "Angelina Jolie", "Taylor Swift",
         "Barack Obama", "Emma Watson", "Brad Pitt", "Oprah Winfrey"]  # fmt: skip


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Clock:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.s: dict[str, float] = {}

    def run(self, stage: str, fn: Callable[[], Any]) -> Any:
        sync(self.device)
        t = time.perf_counter()
        out = fn()
        sync(self.device)
        self.s[stage] = self.s.get(stage, 0.0) + time.perf_counter() - t
        return out


def loaders(
    size: str, masks: MaskSettings, device: torch.device
) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """(load the pipeline, load the masker) for a size; real sizes are random-weight builds."""
    if size == "tiny":
        return (lambda: build_tiny_pipeline().to(device)), (lambda: load_masker(masks, device, tiny=True))
    sys.path.insert(0, str(Path(__file__).parent))
    from masking_datagen import real_grounding_dino, real_pipeline, real_transformers_sam_h

    def masker() -> GroundedSam:
        dino, sam = real_grounding_dino(device), real_transformers_sam_h(device)
        return GroundedSam("grounded-sam", dino, sam, device, torch.bfloat16)

    return (lambda: real_pipeline(device)), masker


def stage2(pipe, masker, settings: EraseSettings, device, concepts, clock: Clock) -> None:
    """Images, masks and LoRAs of ``concepts`` as one batch (one concept: the reference way)."""
    W = get_attn2_weights(pipe.unet)
    worker = ConceptBatchWorker(pipe, settings, device, W, W, masker=masker)
    images = clock.run("generate", lambda: worker.generate(concepts))
    masks = clock.run(
        "mask", lambda: [worker.masks(c, im)[0] for c, im in zip(concepts, images, strict=True)]
    )
    clock.run("train", lambda: worker.train(concepts, images, masks))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=("tiny", "real"), default="tiny")
    ap.add_argument("--concepts", type=int, default=8)
    ap.add_argument("--k", type=int, default=4, help="concepts per batch on the fast path")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--steps", type=int, default=30, help="DPM-Solver steps per image")
    ap.add_argument("--train-steps", type=int, default=50)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    device = pick_device()
    if args.size == "real" and device.type != "cuda":
        raise SystemExit("--size real needs a GPU")
    concepts = [Concept(n, ConceptType.CELEBRITY, "a person") for n in NAMES[: args.concepts]]
    data = DataSettings(images_per_concept=args.images, inference_steps=args.steps)
    train = TrainSettings(steps=args.train_steps)
    masks = MaskSettings()
    load, load_mask = loaders(args.size, masks, device)

    # Reference: per concept, load everything, fp32, batch 1.
    ref = Clock(device)
    ref_settings = EraseSettings(train=train, data=data, masks=masks, precision="fp32")
    for c in concepts:
        pipe = ref.run("load", load)
        masker = ref.run("load", load_mask)
        stage2(pipe, masker, ref_settings, device, [c], ref)
        del pipe, masker
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # Fast path: load once, K concepts per batch, mixed precision on GPUs.
    fast = Clock(device)
    fast_settings = EraseSettings(train=train, data=data, masks=masks, precision="auto")
    pipe = fast.run("load", load)
    masker = fast.run("load", load_mask)
    for i in range(0, len(concepts), args.k):
        stage2(pipe, masker, fast_settings, device, concepts[i : i + args.k], fast)

    n = len(concepts)
    per = {
        name: {k: round(v / n, 3) for k, v in clock.s.items()}
        for name, clock in (("reference", ref), ("fast", fast))
    }
    for name in per:
        per[name]["total"] = round(sum(per[name].values()), 3)
    ratios = {k: round(per["reference"][k] / per["fast"][k], 2) for k in per["fast"] if per["fast"][k] > 0}
    res = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else f"cpu ({platform.machine()})",
        "torch": torch.__version__,
        "size": args.size,
        "concepts": n,
        "k": args.k,
        "work": f"{args.images} images x {args.steps} steps, {args.train_steps} LoRA steps, Grounded-SAM",
        "seconds_per_concept": per,
        "reference_over_fast": ratios,
    }
    print(json.dumps(res, indent=1))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "gpu" if device.type == "cuda" else "cpu"
    (out / f"speed_{args.size}_{tag}.json").write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
