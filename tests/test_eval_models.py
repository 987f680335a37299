"""The evaluation's models on tiny inputs: generation with fixed seeds, the tiny CLIP, the FID
Inception loaded from a safetensors file, NudeNet's packaged ONNX detector."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import assert_same_seed_images

from mace_core.errors import ModelLoadError
from mace_core.evaluation.clip_model import build_tiny_clip
from mace_core.evaluation.errors import EvalInputError
from mace_core.evaluation.features import InceptionFeatures, build_fid_inception
from mace_core.evaluation.generation import generate_eval_images
from mace_core.evaluation.metrics import exposed_counts
from mace_core.evaluation.nudity import NudityDetector
from mace_core.evaluation.settings import GenerationSettings
from mace_core.evaluation.suites import objects_suite
from mace_core.imageio import png_bytes

FAST = GenerationSettings(inference_steps=2, batch_size=3)


@pytest.fixture(scope="module")
def generated(tiny_pipe):
    prompts = list(objects_suite(["cat"], images_per_prompt=1).prompts[:4])
    return prompts, generate_eval_images(tiny_pipe, prompts, FAST)


def test_images_depend_on_their_seed_only(tiny_pipe, generated):
    prompts, images = generated
    assert len(images) == 4 and images[0].shape == (32, 32, 3) and images[0].dtype == np.uint8
    # Alone, in another batch composition and order: the same images (up to fp32 kernel
    # rounding, which differs between batch sizes on some CPUs).
    alone = generate_eval_images(tiny_pipe, [prompts[2]], FAST)[0]
    shuffled = generate_eval_images(tiny_pipe, [prompts[3], prompts[2]], FAST)
    assert_same_seed_images(images, [*images[:2], alone, images[3]])
    assert_same_seed_images(images, [*images[:2], shuffled[1], shuffled[0]])
    assert not np.array_equal(images[0], images[1])


def test_tiny_clip_embeds_images_and_texts(generated):
    clip = build_tiny_clip()
    img = clip.image_embeddings(generated[1])
    txt = clip.text_embeddings(["a photo of a cat", "a long prompt " * 60])  # truncated to 77 tokens
    assert img.shape == (4, clip.dim) and txt.shape == (2, clip.dim)
    assert torch.isfinite(img).all() and torch.isfinite(txt).all()
    assert torch.allclose(build_tiny_clip().image_embeddings(generated[1][:1]), img[:1])  # seeded


def test_nudenet_detector_runs_offline_on_a_generated_image(generated):
    detector = NudityDetector()  # the ONNX model inside the nudenet wheel, via onnxruntime
    detections = detector.detect(png_bytes(generated[1][0]))
    assert isinstance(detections, list)
    for d in detections:
        assert set(d) == {"class", "score", "box"} and 0.0 <= d["score"] <= 1.0
    counts = exposed_counts([detections])
    assert all(v >= 0 for v in counts.values())
    # The session really ran the packaged model on the CPU.
    assert detector.detector.onnx_session.get_inputs()[0].shape[1] == 3


def test_fid_inception_loads_safetensors_weights(tmp_path, generated):
    from safetensors.torch import save_file

    # Random weights in the exact layout of pytorch-fid's FID Inception state dict.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        state = {k: v.contiguous() for k, v in build_fid_inception().state_dict().items()}
    weights = tmp_path / "fid_inception.safetensors"
    save_file(state, str(weights))
    feats = InceptionFeatures(str(weights), torch.device("cpu"), batch_size=2)(generated[1][:2])
    assert feats.shape == (2, 2048) and feats.dtype == torch.float64 and torch.isfinite(feats).all()

    del state["fc.weight"]
    save_file(state, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ModelLoadError, match="do not fit the FID Inception-v3"):
        InceptionFeatures(str(tmp_path / "partial.safetensors"), torch.device("cpu"))
    (tmp_path / "w.pth").write_bytes(b"not read")
    with pytest.raises(EvalInputError, match="only .safetensors files are read"):
        InceptionFeatures(str(tmp_path / "w.pth"), torch.device("cpu"))
