"""Seconds per concept of MACE Stage 2's data preparation: image generation and Grounded-SAM masks.

Two sizes, random weights (cost depends on shapes, not on weight values):
  - tiny: the built-in tiny pipeline, Grounding DINO and SAMs (the models the tests use);
  - real: SD 1.x-shaped pipeline (UNet 860 M, VAE, CLIP-L text encoder, 512 px), Grounding
    DINO Swin-T + BERT-base at 800 px, SAM ViT-H at 1024 px (transformers and
    segment_anything). Default on CUDA only; fp32 and fp16 (generation) / bf16 (masks).

Generation goes through ``mace_core.datagen.generate_images`` (DPM-Solver, CFG 7.5), one
concept alone and several concepts in one batch. Masks go through the ``Masker`` that
``load_masker`` returns. Random detectors find arbitrary numbers of boxes, so besides the
end-to-end call the masking is split into detection and SAM with a fixed 3 boxes per image.

Usage: python benchmarks/masking_datagen.py [--sizes tiny,real] [--concepts 4] [--images 8]
       [--steps 30] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mace_core.clip_text import clip_tokenizer
from mace_core.concepts import Concept, ConceptType
from mace_core.datagen import generate_images
from mace_core.families.sd1 import build_tiny_pipeline
from mace_core.families.stable_diffusion import assemble_pipeline
from mace_core.grounding import GroundingDino, tiny_bert_vocab
from mace_core.masking import GroundedSam, load_masker
from mace_core.segmentation import SegmentAnythingSam, TransformersSam, build_segment_anything
from mace_core.settings import DataSettings, MaskSettings

CONCEPTS = [
    Concept("dog", ConceptType.OBJECT, "scene"),
    Concept("Bill Clinton", ConceptType.CELEBRITY, "a person"),
    Concept("airplane", ConceptType.OBJECT, "sky"),
    Concept("Angelina Jolie", ConceptType.CELEBRITY, "a person"),
    Concept("ship", ConceptType.OBJECT, "ground"),
    Concept("Tom Hanks", ConceptType.CELEBRITY, "a person"),
    Concept("bird", ConceptType.OBJECT, "street"),
    Concept("Taylor Swift", ConceptType.CELEBRITY, "a person"),
]
BOXES_PER_IMAGE = 3


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t, out


def guarded(name: str, fn: Callable[[], dict]) -> dict:
    """Run one section; an error is recorded, not fatal (one broken section must not hide the rest)."""
    t = time.perf_counter()
    try:
        out = fn()
    except Exception as e:
        traceback.print_exc()
        out = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    print(f"[{name}] {time.perf_counter() - t:.1f}s {json.dumps(out)}", flush=True)
    return out


def peak_gb(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None


# ---------------------------------------------------------------- generation


def bench_generation(
    pipe, device: torch.device, args: argparse.Namespace, max_batch_images: int | None
) -> tuple[dict, list[np.ndarray]]:
    settings = DataSettings(images_per_concept=args.images, inference_steps=args.steps)
    k = min(args.concepts, len(CONCEPTS))
    # Warm-up (kernel selection, allocator), two steps.
    generate_images(pipe, CONCEPTS[:1], DataSettings(images_per_concept=args.images, inference_steps=2))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    alone, _ = timed(lambda: generate_images(pipe, CONCEPTS[:1], settings, max_batch_images), device)
    batched, images = timed(lambda: generate_images(pipe, CONCEPTS[:k], settings, max_batch_images), device)
    return {
        "images_per_concept": args.images,
        "steps": args.steps,
        "size_px": int(images[0].shape[1]),
        "one_concept_s": round(alone, 3),
        f"{k}_concepts_per_concept_s": round(batched / k, 3),
        "max_batch_images": max_batch_images,
        "peak_GB": peak_gb(device),
    }, images


# ---------------------------------------------------------------- masks


def fixed_boxes(images: np.ndarray) -> list[np.ndarray]:
    """BOXES_PER_IMAGE nested boxes around the image centre (a typical Grounded-SAM count)."""
    h, w = images.shape[1:3]
    fr = np.linspace(0.2, 0.45, BOXES_PER_IMAGE)
    b = np.stack([w * (0.5 - fr), h * (0.5 - fr), w * (0.5 + fr), h * (0.5 + fr)], axis=1)
    return [b.astype(np.float32)] * len(images)


def bench_masker(masker: GroundedSam, images: np.ndarray, device: torch.device) -> dict:
    text = CONCEPTS[0].text
    masker(images, text)  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    call, result = timed(lambda: masker(images, text), device)
    with masker.precision():
        detect, _ = timed(lambda: masker.detector.detect(images, text), device)
        segment, _ = timed(lambda: masker.segmenter.segment(images, fixed_boxes(images)), device)
    return {
        "images": len(images),
        "per_concept_s": round(call, 3),
        "boxes_found": result.boxes,
        "detect_s": round(detect, 3),
        f"sam_{BOXES_PER_IMAGE}_boxes_per_image_s": round(segment, 3),
        "detect_plus_sam_s": round(detect + segment, 3),
        "peak_GB": peak_gb(device),
    }


# ---------------------------------------------------------------- sizes


def tiny(args: argparse.Namespace, device: torch.device) -> dict:
    out: dict[str, Any] = {}
    holder: dict[str, np.ndarray] = {}

    def gen() -> dict:
        pipe = build_tiny_pipeline().to(device)
        res, images = bench_generation(pipe, device, args, None)
        holder["images"] = images[0]
        return res

    out["generate_fp32"] = guarded("tiny generate fp32", gen)
    images = holder.get("images")
    if images is None:
        images = np.random.default_rng(0).integers(0, 256, (args.images, 32, 32, 3), dtype=np.uint8)
    for backend in ("grounded-sam", "segment-anything"):

        def mask(backend: str = backend) -> dict:
            load_s, masker = timed(
                lambda: load_masker(MaskSettings(masker=backend), device, tiny=True), device
            )
            return {"load_s": round(load_s, 3), **bench_masker(masker, images, device)}

        out[backend] = guarded(f"tiny {backend}", mask)
    return out


def real_pipeline(device: torch.device):  # -> StableDiffusionPipeline, SD 1.x shapes, random weights
    from diffusers import (
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64,
        cross_attention_dim=768,
        attention_head_dim=8,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
    )
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=512,
    )
    text = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            vocab_size=49408,
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )
    sched = DPMSolverMultistepScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
    )
    return assemble_pipeline(vae, text, clip_tokenizer(), unet, sched).to(device)


def real_grounding_dino(device: torch.device) -> GroundingDino:
    """Grounding DINO Swin-T + BERT-base shapes (the transformers defaults), 800 px inputs."""
    from transformers import (
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
    )

    torch.manual_seed(0)
    model = GroundingDinoForObjectDetection(GroundingDinoConfig())
    processor = GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessor(), tokenizer=BertTokenizer(vocab=tiny_bert_vocab())
    )
    return GroundingDino(model, processor, device)


def real_transformers_sam_h(device: torch.device) -> TransformersSam:
    from transformers import SamConfig, SamImageProcessor, SamModel, SamProcessor, SamVisionConfig

    torch.manual_seed(0)
    vision = SamVisionConfig(
        hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, global_attn_indexes=[7, 15, 23, 31]
    )
    model = SamModel(SamConfig(vision_config=vision))
    return TransformersSam(model, SamProcessor(image_processor=SamImageProcessor()), device)


def real(args: argparse.Namespace, device: torch.device) -> dict:
    out: dict[str, Any] = {}
    holder: dict[str, np.ndarray] = {}
    dtypes = [torch.float32] + ([torch.float16] if device.type == "cuda" else [])
    for dtype in dtypes:

        def gen(dtype: torch.dtype = dtype) -> dict:
            pipe = real_pipeline(device).to(dtype=dtype)
            # 16 images a batch (UNet batch 32 with CFG) keeps fp32 VAE decoding in memory.
            res, images = bench_generation(pipe, device, args, 16)
            holder["images"] = images[0]
            del pipe
            if device.type == "cuda":
                torch.cuda.empty_cache()
            return res

        out[f"generate_{str(dtype)[6:]}"] = guarded(f"real generate {dtype}", gen)
    images = holder.get("images")
    if images is None:
        images = np.random.default_rng(0).integers(0, 256, (args.images, 512, 512, 3), dtype=np.uint8)
    autocasts = [None] + ([torch.bfloat16] if device.type == "cuda" else [])
    for backend in ("grounded-sam", "segment-anything"):

        def mask(backend: str = backend) -> dict:
            detector = real_grounding_dino(device)
            if backend == "grounded-sam":
                segmenter = real_transformers_sam_h(device)
            else:
                segmenter = SegmentAnythingSam(build_segment_anything("vit_h"), device)
            res = {}
            for ac in autocasts:
                masker = GroundedSam(backend, detector, segmenter, device, autocast_dtype=ac)
                res["fp32" if ac is None else "bf16_autocast"] = bench_masker(masker, images, device)
            del detector, segmenter
            if device.type == "cuda":
                torch.cuda.empty_cache()
            return res

        out[backend] = guarded(f"real {backend}", mask)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default=None, help="tiny,real (default: tiny on CPU, tiny,real on CUDA)")
    ap.add_argument("--concepts", type=int, default=4, help="concepts in one generation batch")
    ap.add_argument("--images", type=int, default=8, help="images per concept (MACE: 8)")
    ap.add_argument("--steps", type=int, default=30, help="DPM-Solver steps (MACE: 30)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sizes = (args.sizes or ("tiny,real" if device.type == "cuda" else "tiny")).split(",")
    res: dict[str, Any] = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "concepts_batched": args.concepts,
        # Other processes on a shared machine slow every figure: the load says how much.
        "load_average_1m_start": round(os.getloadavg()[0], 2),
    }
    if "tiny" in sizes:
        res["tiny"] = tiny(args, device)
    if "real" in sizes:
        res["real"] = real(args, device)
    res["load_average_1m_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(res, indent=1))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"masking_datagen_{device.type}_{'_'.join(sizes)}.json"
    (out / name).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
