"""Batch sizes from free memory, and splitting a batch that runs out of memory."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_same_seed_images

from mace_core import concept_job
from mace_core.attn2 import get_attn2_weights
from mace_core.batching import (
    CPU_CONCEPTS_PER_BATCH,
    MAX_CONCEPTS_PER_BATCH,
    plan_batches,
    shrink_on_oom,
)
from mace_core.concept_job import ConceptBatchWorker
from mace_core.concepts import Concept, ConceptType
from mace_core.settings import DataSettings, EraseSettings, MaskSettings, TrainSettings

CPU = torch.device("cpu")
GIB = 1024**3


def test_plan_on_cpu_is_the_fixed_default(tiny_pipe):
    plan = plan_batches(CPU, tiny_pipe.unet, 4, mixed_precision=False)
    assert (plan.concepts_per_batch, plan.max_batch_images, plan.free_bytes) == (
        CPU_CONCEPTS_PER_BATCH,
        None,
        None,
    )


def test_plan_grows_with_free_memory_and_is_capped(tiny_pipe):
    """SD 1.x at 64x64 latents: bf16 training needs ~1.1 GB a concept, fp32 ~4x that."""
    from diffusers import UNet2DConditionModel

    # An SD 1.x-shaped UNet on the meta device: its parameter count without the memory.
    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8)
    cuda = torch.device("cuda")
    small = plan_batches(cuda, unet, 64, mixed_precision=True, free_bytes=4 * GIB)
    mid = plan_batches(cuda, unet, 64, mixed_precision=True, free_bytes=12 * GIB)
    big = plan_batches(cuda, unet, 64, mixed_precision=True, free_bytes=130 * GIB)
    fp32 = plan_batches(cuda, unet, 64, mixed_precision=False, free_bytes=12 * GIB)
    assert small.concepts_per_batch < mid.concepts_per_batch < big.concepts_per_batch
    assert big.concepts_per_batch == MAX_CONCEPTS_PER_BATCH
    assert fp32.concepts_per_batch < mid.concepts_per_batch
    assert plan_batches(cuda, unet, 64, True, free_bytes=GIB // 2).concepts_per_batch == 1
    # Smaller images need less memory per sample: more concepts fit.
    assert (
        plan_batches(cuda, unet, 32, True, free_bytes=4 * GIB).concepts_per_batch > small.concepts_per_batch
    )
    assert small.max_batch_images < big.max_batch_images


def oom(limit: int):
    calls: list[int] = []

    def run(chunk: list[int]) -> list[int]:
        calls.append(len(chunk))
        if len(chunk) > limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [x * 10 for x in chunk]

    return run, calls


def test_shrink_on_oom_halves_until_it_fits_and_keeps_order():
    run, calls = oom(limit=2)
    sizes: list[int] = []
    assert shrink_on_oom(list(range(7)), 7, run, sizes.append) == [x * 10 for x in range(7)]
    assert sizes == [3, 1]  # 7 -> 3 -> 1: the size that fitted is kept for the rest
    assert calls == [7, 3, 1, 1, 1, 1, 1, 1, 1]


def test_shrink_on_oom_reraises_when_one_does_not_fit_or_the_error_is_another():
    run, _ = oom(limit=0)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        shrink_on_oom([1, 2], 2, run)

    def broken(chunk: list[int]) -> list[int]:
        raise ValueError("not a memory problem")

    with pytest.raises(ValueError, match="not a memory problem"):
        shrink_on_oom([1, 2, 3], 3, broken)


CONCEPTS = [
    Concept("Bill Clinton", ConceptType.CELEBRITY, "a person"),
    Concept("Tom Hanks", ConceptType.CELEBRITY, "a person"),
    Concept("Angelina Jolie", ConceptType.CELEBRITY, "a person"),
]
SETTINGS = EraseSettings(
    train=TrainSettings(steps=3),
    data=DataSettings(images_per_concept=2, inference_steps=2),
    masks=MaskSettings(masker="whole-image"),
    prompts_per_concept=3,
)


def test_a_batch_that_runs_out_of_memory_is_split_with_the_same_loras(tiny_pipe, monkeypatch):
    """Training 3 concepts where only 1 fits gives the LoRAs of the unsplit batch."""
    w = get_attn2_weights(tiny_pipe.unet)
    worker = ConceptBatchWorker(tiny_pipe, SETTINGS, CPU, w, w)
    images = worker.generate(CONCEPTS)
    masks = [worker.masks(c, im)[0] for c, im in zip(CONCEPTS, images, strict=True)]
    whole = worker.train(CONCEPTS, images, masks)

    real_train = concept_job.train_loras
    sizes: list[int] = []

    def small_gpu(unet, vae, sched, enc, jobs, *args, **kwargs):
        sizes.append(len(jobs))
        if len(jobs) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return real_train(unet, vae, sched, enc, jobs, *args, **kwargs)

    monkeypatch.setattr(concept_job, "train_loras", small_gpu)
    split_worker = ConceptBatchWorker(tiny_pipe, SETTINGS, CPU, w, w, concepts_per_batch=3)
    split = split_worker.train(CONCEPTS, images, masks)
    assert sizes == [3, 1, 1, 1] and split_worker.concepts_per_batch == 1
    for (a, la, _), (b, lb, n) in zip(whole, split, strict=True):
        assert n == 1
        assert la == pytest.approx(lb, rel=1e-4, abs=1e-6)
        for key, (A, B) in a.factors.items():
            torch.testing.assert_close(b.factors[key][0], A, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(b.factors[key][1], B, rtol=1e-4, atol=1e-6)


def test_generation_that_runs_out_of_memory_retries_smaller_batches(tiny_pipe, monkeypatch):
    w = get_attn2_weights(tiny_pipe.unet)
    worker = ConceptBatchWorker(tiny_pipe, SETTINGS, CPU, w, w)
    expected = worker.generate(CONCEPTS[:2])
    real_generate = concept_job.generate_images
    seen: list[int | None] = []

    def small_gpu(pipe, concepts, settings, max_batch_images=None, *args):
        seen.append(max_batch_images)
        if max_batch_images is None or max_batch_images > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return real_generate(pipe, concepts, settings, max_batch_images, *args)

    monkeypatch.setattr(concept_job, "generate_images", small_gpu)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    got = worker.generate(CONCEPTS[:2])
    assert seen == [None, 2, 1] and worker.max_batch_images == 1  # 4 images -> 2 -> 1
    assert_same_seed_images(expected, got)
