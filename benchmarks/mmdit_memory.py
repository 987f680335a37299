"""GPU memory of a FLUX.1-dev-sized erase worker: the weights it holds and the peaks of image
generation and LoRA training (MACE Stage 2), as ``ConceptBatchWorker`` runs them.

Sizes, random weights (memory depends on shapes, not on weight values):
  - real: FLUX.1-dev's shapes (``configs/flux1-dev.json``: transformer 11.9 B parameters, T5-XXL
    encoder 4.7 B, CLIP-L, the 16-channel VAE), on CUDA only. The pipeline is built on the GPU
    directly, each component in the dtype a worker holds it in under ``--precision``: with
    ``auto`` the transformer in bf16 (a worker casts the fp32 weights it loads before moving
    them: ``ModelFamily.half_weights``), everything else in fp32; with ``fp32`` all of it fp32.
  - tiny: the built-in tiny FLUX.1 pipeline (any device): a code-path check.

Printed and written (``mmdit_memory_<size>_<device>.json``): parameters and bytes per
component, what the worker holds once its models are loaded, and the peak of each stage
(``torch.cuda.max_memory_allocated``; None on a CPU), with the seconds each took.

Usage: python benchmarks/mmdit_memory.py [--size tiny|real] [--precision auto|fp32]
       [--resolution 1024] [--images 1] [--steps 2] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mace_core.concept_job import ConceptBatchWorker
from mace_core.concepts import Concept, ConceptType
from mace_core.settings import DataSettings, EraseSettings, MaskSettings, TrainSettings

GB = 1e9
CONCEPT = Concept("Bill Clinton", ConceptType.CELEBRITY, "a man")


CONFIG = Path(__file__).with_name("configs") / "flux1-dev.json"


def real_flux(device: torch.device, precision: str) -> Any:
    """A FluxPipeline of FLUX.1-dev's shapes (``CONFIG``) with random weights, built on ``device``."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from mace_core.clip_text import clip_tokenizer
    from mace_core.t5_text import t5_tokenizer

    cfg = json.loads(CONFIG.read_text())
    t5_tok = t5_tokenizer(cfg["t5_sequence_length"])
    makers: dict[str, Callable[[], torch.nn.Module]] = {
        "transformer": lambda: FluxTransformer2DModel.from_config(cfg["transformer"]),
        "vae": lambda: AutoencoderKL.from_config(cfg["vae"]),
        "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])),
        "text_encoder_2": lambda: T5EncoderModel(T5Config(vocab_size=len(t5_tok), **cfg["text_encoder_2"])),
    }
    parts = {}
    for name, make in makers.items():
        # Parameters are made in the dtype the worker holds them in, on the GPU: never fp32 first.
        held = torch.bfloat16 if name == "transformer" and precision == "auto" else torch.float32
        previous = torch.get_default_dtype()
        torch.set_default_dtype(held)
        try:
            with device:
                parts[name] = make().eval()
        finally:
            torch.set_default_dtype(previous)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(cfg["scheduler"])
    pipe = FluxPipeline(scheduler=scheduler, tokenizer=clip_tokenizer(), tokenizer_2=t5_tok, **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def components(pipe: Any) -> dict[str, dict[str, Any]]:
    out = {}
    for name, part in pipe.components.items():
        if isinstance(part, torch.nn.Module):
            params = list(part.parameters())
            out[name] = {
                "parameters": sum(p.numel() for p in params),
                "gb": round(sum(p.numel() * p.element_size() for p in params) / GB, 3),
                "dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in params}),
            }
    return out


def measured(device: torch.device, fn: Callable[[], Any]) -> tuple[Any, float | None, float]:
    """``fn()``, its peak of allocated GPU memory (GB; None on a CPU) and its seconds."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    out = fn()
    if cuda:
        torch.cuda.synchronize()
    seconds = round(time.perf_counter() - t, 2)
    return out, (round(torch.cuda.max_memory_allocated() / GB, 2) if cuda else None), seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=("tiny", "real"), default="tiny")
    ap.add_argument("--precision", choices=("auto", "fp32"), default="auto")
    ap.add_argument("--resolution", type=int, default=None, help="default: 1024 real, the model's tiny")
    ap.add_argument("--images", type=int, default=1, help="training images (one diffusion batch)")
    ap.add_argument("--steps", type=int, default=2, help="generation and LoRA steps")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.size == "real" and device.type != "cuda":
        raise SystemExit("--size real needs a GPU (FLUX.1-dev's shapes: 17 B parameters)")

    def build() -> Any:
        if args.size == "real":
            return real_flux(device, args.precision)
        from mace_core.families.flux import build_tiny_pipeline

        return build_tiny_pipeline()

    pipe, _, build_s = measured(device, build)
    settings = EraseSettings(
        data=DataSettings(
            images_per_concept=args.images,
            inference_steps=args.steps,
            resolution=args.resolution or (1024 if args.size == "real" else None),
        ),
        masks=MaskSettings(masker="whole-image"),
        train=TrainSettings(steps=args.steps),
        precision=args.precision,
        prompts_per_concept=4,
    )
    from mace_core.models import pipeline_projections

    original = pipeline_projections(pipe).weights()  # fp32 on the CPU, as a worker takes W
    worker, held_peak, load_s = measured(
        device, lambda: ConceptBatchWorker(pipe, settings, device, original, original)
    )
    held = round(torch.cuda.memory_allocated() / GB, 2) if device.type == "cuda" else None
    data, generate_peak, generate_s = measured(device, lambda: worker.data([CONCEPT]))
    (art,), train_peak, train_s = measured(device, lambda: worker.finish(data))
    result = {
        "size": args.size,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "precision": args.precision,
        "mixed_precision": worker.mixed_precision,
        "resolution": int(data[0].images.shape[1]),
        "images": args.images,
        "steps": args.steps,
        "components": components(pipe),
        "held_gb": held,
        "peak_gb": {"load": held_peak, "generate": generate_peak, "train": train_peak},
        "total_gb": round(torch.cuda.get_device_properties(device).total_memory / GB, 1)
        if device.type == "cuda"
        else None,
        "seconds": {"build": build_s, "load": load_s, "generate": generate_s, "train": train_s},
        "losses_finite": bool(all(l == l for l in art.losses)),  # noqa: E741 (NaN != NaN)
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"mmdit_memory_{args.size}_{device.type}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"written: {path}")


if __name__ == "__main__":
    main()
