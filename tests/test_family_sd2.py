"""SD 2.x end to end on a tiny random SD-2.x-shaped pipeline saved as a diffusers folder:
recognised from its files, loaded, text statistics, images, LoRA training, attention mass."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler
from helpers import assert_text_statistics, train_and_attention_mass

from mace_core.concepts import Concept, ConceptType
from mace_core.evaluation.generation import generate_eval_images
from mace_core.evaluation.settings import GenerationSettings
from mace_core.evaluation.suites import EvalPrompt
from mace_core.families import family_for, family_named, family_of_pipeline
from mace_core.families.sd2 import TINY_SD2_TEXT
from mace_core.models import load_pipeline, load_text_components

CPU = torch.device("cpu")
CLINTON = Concept("Bill Clinton", ConceptType.CELEBRITY, "a man")
SD2 = family_named("sd2")
D = TINY_SD2_TEXT["hidden_size"]


@pytest.fixture(scope="module")
def sd2_folder(tmp_path_factory, tiny_sd2_pipe):
    folder = tmp_path_factory.mktemp("model") / "tiny-sd2"
    tiny_sd2_pipe.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def pipe(sd2_folder):
    """The folder loaded as a run loads a model (its own copy: generation changes its scheduler)."""
    return load_pipeline(str(sd2_folder))


def test_the_folder_is_recognised_and_loads_as_sd2(sd2_folder, pipe, tiny_sd2_pipe):
    assert family_for(str(sd2_folder)) is SD2 and family_of_pipeline(pipe) is SD2
    assert pipe.unet.config.use_linear_projection and pipe.unet.config.cross_attention_dim == D
    assert pipe.text_encoder.config.hidden_act == "gelu"
    assert (pipe.tokenizer.pad_token, pipe.tokenizer.pad_token_id) == ("!", 0)
    assert SD2.prediction_type(pipe) == "v_prediction"
    a, b = tiny_sd2_pipe.unet.state_dict(), pipe.unet.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_text_side_alone_gives_the_same_statistics(sd2_folder, pipe, tmp_path):
    """A CPU worker's text-only copy (no UNet, no VAE) is an sd2 model with the same states."""
    text_only = tmp_path / "text-only"
    text_only.mkdir()
    shutil.copy(sd2_folder / "model_index.json", text_only)
    for part in ("tokenizer", "text_encoder"):
        shutil.copytree(sd2_folder / part, text_only / part)
    assert family_for(str(text_only)) is SD2
    enc = SD2.prompt_encoder(load_text_components(str(text_only)), CPU)
    full = SD2.prompt_encoder(SD2.text_components(pipe), CPU)
    states = enc.encode(["a photo of Bill Clinton!", "a dog"])
    assert states.shape == (2, 77, D) and states.dtype == torch.float32
    assert torch.equal(states, full.encode(["a photo of Bill Clinton!", "a dog"]))
    assert_text_statistics(enc, CLINTON, D)


def test_images_training_and_attention_mass(pipe):
    # Images at the model's size (16 latent px, a VAE that doubles them), v kept by DPM-Solver.
    art, mass = train_and_attention_mass(pipe, SD2, CLINTON, 32)
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert any(B.abs().sum() > 0 for _, B in art.lora.factors.values())
    assert mass["original"] != pytest.approx(mass["zero keys"], rel=1e-3)


def test_evaluation_images_come_from_the_same_family_generation(pipe):
    p = EvalPrompt(id="p0", prompt="a photo of a dog", seed=5, group="g")
    (img,) = generate_eval_images(pipe, [p], GenerationSettings(inference_steps=2))
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    assert np.array_equal(img, SD2.generate(pipe, [p.prompt], [5], 32, 32, 2, 7.5)[0])
