"""How many concepts a worker puts in one batch, from the memory its device has free.

Batch sizes change speed only, never results: every image has its own seed and every
LoRA its own slot with exact per-sample gradients, so a batch that does not fit can be
split and retried (``shrink_on_oom``), as accelerate's ``find_executable_batch_size`` does.

The estimate scales per-sample peaks measured on an H200 with SD 1.x shapes at 512 px
(benchmarks/results/speed_real_gpu.json) by the
model's size and the latent area; ``benchmarks/speed.py`` prints the plan it gives
next to the measured peaks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

log = logging.getLogger(__name__)

T = TypeVar("T")

# SD 1.x UNet (860 M parameters) at 64 x 64 latents, bytes per sample beyond the weights.
SD1_UNET_PARAMS = 859.5e6
SD1_LATENT_AREA = 64 * 64
TRAIN_BYTES_PER_SAMPLE = {"bf16": 1.1e9, "fp32": 4.6e9}
# Generation: one image is 2 UNet samples with CFG (no gradients) plus its VAE decode.
GENERATE_BYTES_PER_IMAGE = {"fp16": 0.45e9, "fp32": 0.9e9}
# Leave room for the allocator's fragmentation and for what the masker needs between stages.
USABLE_FRACTION = 0.7
MAX_CONCEPTS_PER_BATCH = 16  # bf16 training at 16 samples is already ~15x cheaper per sample
MAX_BATCH_IMAGES = 64
CPU_CONCEPTS_PER_BATCH = 4  # the CPU gains nothing from bigger batches (compute-bound)


@dataclass(frozen=True)
class BatchPlan:
    concepts_per_batch: int  # LoRAs trained in one UNet batch
    max_batch_images: int | None  # images per diffusion batch; None: no limit
    free_bytes: int | None  # what the estimate started from (None on CPU)

    def to_dict(self) -> dict[str, int | None]:
        return {
            "concepts_per_batch": self.concepts_per_batch,
            "max_batch_images": self.max_batch_images,
            "free_bytes": self.free_bytes,
        }


def plan_batches(
    device: torch.device,
    unet: torch.nn.Module,
    latent_size: int,
    mixed_precision: bool,
    free_bytes: int | None = None,
) -> BatchPlan:
    """Concepts per training batch and images per diffusion batch that fit in free memory.

    Call it after the worker's models are on the device: ``free_bytes`` (default: what
    CUDA reports free now) is then what batches can use.
    """
    if device.type != "cuda":
        return BatchPlan(CPU_CONCEPTS_PER_BATCH, None, None)
    if free_bytes is None:
        free_bytes = torch.cuda.mem_get_info(device)[0]
    params = sum(p.numel() for p in unet.parameters())
    scale = (params / SD1_UNET_PARAMS) * (latent_size * latent_size / SD1_LATENT_AREA)
    usable = USABLE_FRACTION * free_bytes
    train = TRAIN_BYTES_PER_SAMPLE["bf16" if mixed_precision else "fp32"] * scale
    gen = GENERATE_BYTES_PER_IMAGE["fp16" if mixed_precision else "fp32"] * scale
    k = max(1, min(MAX_CONCEPTS_PER_BATCH, int(usable // train)))
    images = max(1, min(MAX_BATCH_IMAGES, int(usable // gen)))
    return BatchPlan(k, images, int(free_bytes))


def is_out_of_memory(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and "out of memory" in str(e).lower()
    )


def halve_on_oom(
    attempt: Callable[[int | None], T],
    size: int | None,
    total: int,
    on_shrink: Callable[[int], None] | None = None,
) -> T:
    """``attempt(size)``, halving ``size`` after each out-of-memory error until it fits.

    ``size`` None means all ``total`` at once. A size of one that still does not fit, and
    any other error, re-raise. ``on_shrink`` is told each new size, so a worker remembers it.
    """
    while True:
        try:
            return attempt(size)
        except Exception as e:
            if not is_out_of_memory(e) or size == 1:
                raise
        # Outside the handler: the failed attempt's tensors are released before retrying.
        size = max(1, min(size or total, total) // 2)
        log.warning("out of memory; retrying with batches of %d", size)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if on_shrink is not None:
            on_shrink(size)


def shrink_on_oom(
    items: list[T], size: int, run: Callable[[list[T]], list], on_shrink: Callable[[int], None] | None = None
) -> list:
    """``run`` over ``items`` in chunks of ``size``, halving the chunk after an out-of-memory error.

    Results are concatenated in order; the size that fitted is kept for the next chunks.
    """
    out: list = []
    start = 0
    while start < len(items):
        rest = items[start:]
        part, size = halve_on_oom(
            lambda n, rest=rest: (run(rest[:n]), n), min(size, len(rest)), len(rest), on_shrink
        )
        out += part
        start += size
    return out
