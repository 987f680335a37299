"""Reference way vs fast path of MACE Stage 2 (images, masks, LoRA), in one run, same inputs.

Reference way (as the method is usually run): one concept at a time, models loaded for
every concept, fp32 everywhere (generation, Grounded-SAM, training), LoRA trained with
batch 1. Fast path (what `mace-ray erase` does): models loaded once per worker, K concepts
per batch (images in one diffusion batch, LoRAs in one UNet batch with per-sample
adapters), and on a GPU fp16 generation, bf16 Grounded-SAM and bf16 training
(``precision=auto``); K from the GPU's free memory (``ConceptBatchWorker.plan``) unless
``--k`` is given. Both paths run an untimed warm-up first (CUDA context, kernels), then
are timed on the same concepts. Prints seconds per concept for each stage, the ratios,
and on a GPU the fast path's peak memory per stage next to the batch plan.

Sizes: ``tiny`` (the built-in tiny models, CPU or GPU) and ``real`` (SD 1.x-shaped UNet
860 M, CLIP-L, VAE at 512 px, Grounding DINO Swin-T, SAM ViT-H; random weights). Real
models are built once and saved as folders, so that both paths load them through the
loaders a run uses (``load_pipeline``, ``load_masker``); ``--allow-cpu`` runs real sizes
on a CPU only to check the code path (use tiny work: --images 1 --steps 2 --train-steps 2).

Usage: python benchmarks/speed.py [--size tiny|real] [--concepts 8] [--reference-concepts N]
                                  [--k auto|K] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

# benchmarks/ is on the path when this runs as a script: the real-size builders are shared.
from masking_datagen import fixed_boxes, real_grounding_dino, real_pipeline, real_transformers_sam_h, sync

from mace_core.attn2 import get_attn2_weights
from mace_core.concept_job import ConceptBatchWorker
from mace_core.concepts import Concept, ConceptType
from mace_core.families.sd1 import build_tiny_pipeline
from mace_core.masking import default_autocast, load_masker
from mace_core.models import load_pipeline, pick_device
from mace_core.settings import DataSettings, EraseSettings, MaskSettings, TrainSettings

NAMES = ["Bill Clinton", "Tom Hanks", "Angelina Jolie", "Taylor Swift", "Barack Obama",
         "Emma Watson", "Brad Pitt", "Oprah Winfrey", "Morgan Freeman", "Meryl Streep",
         "Keanu Reeves", "Natalie Portman", "Denzel Washington", "Scarlett Johansson",
         "Leonardo DiCaprio", "Cate Blanchett", "Samuel L. Jackson", "Nicole Kidman",
         "Will Smith", "Julia Roberts", "Johnny Depp", "Kate Winslet", "Hugh Jackman",
         "Anne Hathaway", "Robert De Niro", "Sandra Bullock", "Matt Damon", "Halle Berry",
         "George Clooney", "Jennifer Lawrence", "Ryan Gosling", "Emma Stone"]  # fmt: skip
GB = 1024**3


class Clock:
    """Seconds per stage and, on CUDA, the peak memory allocated during each stage."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.s: dict[str, float] = {}
        self.peak_gb: dict[str, float] = {}

    def run(self, stage: str, fn: Callable[[], Any]) -> Any:
        sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        out = fn()
        sync(self.device)
        self.s[stage] = self.s.get(stage, 0.0) + time.perf_counter() - t
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated() / GB
            self.peak_gb[stage] = round(max(peak, self.peak_gb.get(stage, 0.0)), 2)
        return out


def real_folders(root: Path) -> tuple[str, MaskSettings]:
    """SD 1.x, Grounding DINO Swin-T and SAM ViT-H shapes with random weights, saved as folders."""
    cpu = torch.device("cpu")
    sd, dino_dir, sam_dir = root / "sd", root / "dino", root / "sam"
    real_pipeline(cpu).save_pretrained(sd)
    dino = real_grounding_dino(cpu)
    dino.model.save_pretrained(dino_dir)
    dino.processor.save_pretrained(dino_dir)
    del dino
    sam = real_transformers_sam_h(cpu)
    sam.model.save_pretrained(sam_dir)
    sam.processor.save_pretrained(sam_dir)
    del sam
    return str(sd), MaskSettings(detector=str(dino_dir), segmenter=str(sam_dir))


def loaders(
    size: str, masks: MaskSettings, device: torch.device, root: Path
) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """(load the pipeline, load the masker) for a size, through the loaders a run uses."""
    if size == "tiny":
        return (lambda: build_tiny_pipeline().to(device)), (lambda: load_masker(masks, device, tiny=True))
    sd, masks = real_folders(root)
    return (lambda: load_pipeline(sd).to(device)), (lambda: load_masker(masks, device))


def stage2(worker: ConceptBatchWorker, concepts: list[Concept], clock: Clock) -> None:
    """Images, masks and LoRAs of ``concepts`` as one batch (one concept: the reference way)."""
    images = clock.run("generate", lambda: worker.generate(concepts))
    masks = clock.run(
        "mask", lambda: [worker.masks(c, im)[0] for c, im in zip(concepts, images, strict=True)]
    )
    clock.run("train", lambda: worker.train(concepts, images, masks))


class ThreeBoxes:
    """The detector runs as it is, then every image gets exactly 3 boxes for SAM.

    Random detectors find arbitrary numbers of boxes (none, or hundreds), and not the same
    in fp32 and bf16; a trained Grounding DINO finds one to a few per celebrity image. The
    masking stage then costs on both paths what it costs in a run.
    """

    def __init__(self, detector) -> None:
        self.detector = detector

    def detect(self, images: np.ndarray, text: str) -> list[np.ndarray]:
        self.detector.detect(images, text)
        return fixed_boxes(images)


def make_worker(pipe, masker, settings: EraseSettings, device: torch.device) -> ConceptBatchWorker:
    # The benchmark trains from W itself: CFR changes the weights, not the work.
    W = get_attn2_weights(pipe.unet)
    if not isinstance(masker.detector, ThreeBoxes):
        masker.detector = ThreeBoxes(masker.detector)
    # The reference runs Grounded-SAM in fp32 too; the fast path as a run does (bf16 on CUDA).
    masker.autocast_dtype = None if settings.precision == "fp32" else default_autocast(device)
    return ConceptBatchWorker(pipe, settings, device, W, W, masker=masker)


def per_concept(clock: Clock, n: int) -> dict[str, float]:
    out = {k: round(v / n, 3) for k, v in clock.s.items()}
    out["total"] = round(sum(out.values()), 3)
    out["total_without_load"] = round(out["total"] - out.get("load", 0.0), 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=("tiny", "real"), default="tiny")
    ap.add_argument("--concepts", type=int, default=8, help="concepts on the fast path")
    ap.add_argument(
        "--reference-concepts", type=int, default=None, help="concepts timed the reference way (default: all)"
    )
    ap.add_argument("--k", default="4", help="concepts per batch on the fast path, or auto (GPU memory)")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--steps", type=int, default=30, help="DPM-Solver steps per image")
    ap.add_argument("--train-steps", type=int, default=50)
    ap.add_argument("--allow-cpu", action="store_true", help="real sizes on a CPU (a code-path check)")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    device = pick_device()
    if args.size == "real" and device.type != "cuda" and not args.allow_cpu:
        raise SystemExit("--size real needs a GPU (or --allow-cpu for a code-path check)")
    if not 1 <= args.concepts <= len(NAMES):
        raise SystemExit(f"--concepts must be in 1..{len(NAMES)}")
    root = Path(tempfile.mkdtemp(prefix="mace-speed-"))
    try:
        run(args, device, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run(args: argparse.Namespace, device: torch.device, root: Path) -> None:
    n_ref = min(args.reference_concepts or args.concepts, args.concepts)
    concepts = [Concept(n, ConceptType.CELEBRITY, "a person") for n in NAMES[: args.concepts]]
    data = DataSettings(images_per_concept=args.images, inference_steps=args.steps)
    train = TrainSettings(steps=args.train_steps)
    masks = MaskSettings()
    ref_settings = EraseSettings(train=train, data=data, masks=masks, precision="fp32")
    fast_settings = EraseSettings(train=train, data=data, masks=masks, precision="auto")
    warm = EraseSettings(
        train=TrainSettings(steps=2), data=DataSettings(images_per_concept=2, inference_steps=2)
    )
    t = time.perf_counter()
    load, load_mask = loaders(args.size, masks, device, root)
    print(f"models ready in {time.perf_counter() - t:.1f} s", flush=True)

    # Warm-up, untimed: CUDA context, cuBLAS/cuDNN handles and kernels of both precisions.
    pipe, masker = load(), load_mask()
    for precision in ("fp32", "auto"):
        s = EraseSettings(train=warm.train, data=warm.data, masks=masks, precision=precision)
        stage2(make_worker(pipe, masker, s, device), concepts[:1], Clock(device))
    del pipe, masker
    if device.type == "cuda":
        torch.cuda.empty_cache()
    print("warm-up done", flush=True)

    # Reference: per concept, load everything, fp32, batch 1.
    ref = Clock(device)
    for c in concepts[:n_ref]:
        pipe = ref.run("load", load)
        masker = ref.run("load", load_mask)
        stage2(make_worker(pipe, masker, ref_settings, device), [c], ref)
        del pipe, masker
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"reference: {c.text} done", flush=True)
    # Written now too: a fast path that fails or runs out of time leaves the reference figures.
    header = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else f"cpu ({platform.machine()})",
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "size": args.size,
        "work": f"{args.images} images x {args.steps} steps, {args.train_steps} LoRA steps, Grounded-SAM",
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"speed_{args.size}_{'gpu' if device.type == 'cuda' else 'cpu'}.json"
    partial = {**header, "status": "reference only", "reference": per_concept(ref, n_ref)}
    path.write_text(json.dumps(partial, indent=1) + "\n")

    # Fast path: load once, K concepts per batch, mixed precision on GPUs.
    fast = Clock(device)
    pipe = fast.run("load", load)
    masker = fast.run("load", load_mask)
    worker = make_worker(pipe, masker, fast_settings, device)
    plan = worker.plan()  # on a CPU: 4 concepts, no image limit
    k = plan.concepts_per_batch if args.k == "auto" else int(args.k)
    for i in range(0, len(concepts), k):
        stage2(worker, concepts[i : i + k], fast)
        print(f"fast: {min(i + k, len(concepts))}/{len(concepts)} done", flush=True)

    per = {"reference": per_concept(ref, n_ref), "fast": per_concept(fast, len(concepts))}
    ratios = {
        key: round(per["reference"][key] / per["fast"][key], 2)
        for key in per["fast"]
        if per["fast"][key] > 0 and key in per["reference"]
    }
    res = {
        **header,
        "status": "complete",
        "concepts": {"reference": n_ref, "fast": len(concepts)},
        "k": k,
        "batch_plan": plan.to_dict(),
        "batch_after_oom_retries": {
            "concepts_per_batch": worker.concepts_per_batch,
            "max_batch_images": worker.max_batch_images,
        },
        "seconds_per_concept": per,
        "reference_over_fast": ratios,
        "fast_peak_gb": fast.peak_gb or None,
        "reference_peak_gb": ref.peak_gb or None,
        # Arithmetic on the figures above, not a measurement: Stage 2 of 1000 concepts on 8
        # such devices, one worker each, models loaded once per worker (reference: per concept).
        "projection_1000_concepts_8_devices_minutes": {
            "reference": round(1000 / 8 * per["reference"]["total"] / 60, 1),
            "fast": round((1000 / 8 * per["fast"]["total_without_load"] + fast.s.get("load", 0.0)) / 60, 1),
        },
    }
    print(json.dumps(res, indent=1))
    path.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
