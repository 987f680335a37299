"""Training-image generation (MACE Stage 2): per-image seeds, batch composition, chunking, dtypes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mace_core.concepts import Concept, ConceptType
from mace_core.datagen import generate_images, image_seeds
from mace_core.families.base import initial_noise
from mace_core.families.sd1 import build_tiny_pipeline
from mace_core.settings import DataSettings

DOG = Concept("dog", ConceptType.OBJECT, "scene")
CLINTON = Concept("Bill Clinton", ConceptType.CELEBRITY, "a person")
VAN_GOGH = Concept("Van Gogh", ConceptType.STYLE, "art")
# 16 px (the tiny VAE does not downsample): 4x fewer attention tokens than its native 32 px.
FAST = DataSettings(images_per_concept=2, inference_steps=2, resolution=16)


@pytest.fixture(scope="module")
def pipe64():
    """The tiny pipeline in float64.

    Matrix kernels may round differently for different batch sizes (here the fp32 UNet's
    outputs move by ~1e-6 between batch 1 and 8), which can flip a uint8 pixel by one
    level. In float64 those differences are ~1e-15, so exact equality across batch
    compositions tests what this module controls: which noise and prompt each image gets.
    """
    return build_tiny_pipeline().to(dtype=torch.float64)


def test_a_concept_gets_the_same_images_in_any_batch_composition(pipe64):
    (alone,) = generate_images(pipe64, [DOG], FAST)
    assert alone.shape == (2, 16, 16, 3) and alone.dtype == np.uint8
    assert not np.array_equal(alone[0], alone[1])  # different seeds, different images
    mixed = generate_images(pipe64, [CLINTON, DOG, VAN_GOGH], FAST)
    assert np.array_equal(mixed[1], alone)
    # Chunks of 3 put the dog's images in two pipeline calls, each shared with another concept.
    chunked = generate_images(pipe64, [VAN_GOGH, DOG], FAST, max_batch_images=3)
    assert np.array_equal(chunked[1], alone) and np.array_equal(chunked[0], mixed[2])
    (single,) = generate_images(pipe64, [DOG], FAST, max_batch_images=1)
    assert np.array_equal(single, alone)


def test_fp32_repeats_exactly_and_composition_changes_at_most_rounding(tiny_pipe):
    (a,) = generate_images(tiny_pipe, [DOG], FAST)
    (b,) = generate_images(tiny_pipe, [DOG], FAST)
    assert np.array_equal(a, b)
    c = generate_images(tiny_pipe, [CLINTON, DOG], FAST, max_batch_images=2)[1]
    diff = np.abs(a.astype(int) - c.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-2


def test_initial_noise_depends_only_on_the_image_seed():
    seeds = image_seeds(DOG, FAST)
    assert len(set(seeds)) == 2
    # More images per concept keep the first ones: image i's seed does not depend on N.
    assert image_seeds(DOG, DataSettings(images_per_concept=5))[:2] == seeds
    assert image_seeds(CLINTON, FAST) != seeds
    assert image_seeds(DOG, DataSettings(images_per_concept=2, seed=1)) != seeds

    def noise(dtype, ss):
        return initial_noise([torch.Generator().manual_seed(s) for s in ss], (4, 8, 8), dtype)

    full = noise(torch.float32, seeds)
    assert full.shape == (2, 4, 8, 8)
    assert torch.equal(noise(torch.float32, seeds[1:2])[0], full[1])
    # fp16 starts from the same noise, rounded: same seed, same image up to precision.
    assert torch.equal(noise(torch.float16, seeds), full.half())


def test_fp16_pipeline_generates_close_images(tiny_pipe):
    pipe16 = build_tiny_pipeline().to(dtype=torch.float16)
    (img16,) = generate_images(pipe16, [DOG], FAST)
    (img32,) = generate_images(tiny_pipe, [DOG], FAST)
    assert img16.dtype == np.uint8 and img16.shape == img32.shape
    assert np.abs(img16.astype(int) - img32.astype(int)).mean() < 2.0


def test_no_concepts_and_bad_chunk_size(tiny_pipe):
    assert generate_images(tiny_pipe, [], FAST) == []
    with pytest.raises(ValueError, match="max_batch_images"):
        generate_images(tiny_pipe, [DOG], FAST, max_batch_images=0)
