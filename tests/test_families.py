"""The model-family seam: which family a model is, refusals before any weights are read, the
padding rule (alignment and the Eq. 3 token mask by position, whatever the pad token) and
the prediction type that generation keeps."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from mace_core.alignment import align_tokens
from mace_core.concepts import Concept, ConceptType
from mace_core.errors import ModelLoadError
from mace_core.families import families, family_for, family_named, family_of_pipeline
from mace_core.families.sd2 import build_tiny_pipeline as build_tiny_sd2
from mace_core.models import load_pipeline, load_text_components
from mace_core.train import concept_token_mask, loss_token_mask

CPU = torch.device("cpu")
CLINTON = Concept("Bill Clinton", ConceptType.CELEBRITY, "a man")
SD1, SD2 = family_named("sd1"), family_named("sd2")


def fake_pipeline_folder(root, class_name: str, pad_token: str | None = None):
    """A pipeline folder whose weights are garbage: loading them would fail differently."""
    root.mkdir()
    (root / "model_index.json").write_text(
        json.dumps({"_class_name": class_name, "unet": ["diffusers", "X"]})
    )
    (root / "unet").mkdir()
    (root / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    if pad_token is not None:
        (root / "tokenizer").mkdir()
        (root / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({"pad_token": pad_token}))
    return str(root)


def test_every_family_module_is_found_once():
    assert [f.name for f in families()] == ["flux", "sd1", "sd2", "sd3", "sdxl"]
    assert family_for("tiny") is SD1


def test_loaded_and_saved_pipelines_are_told_apart(tiny_pipe, tiny_sd2_pipe, tiny_model_folder):
    assert family_of_pipeline(tiny_pipe) is SD1 and family_of_pipeline(tiny_sd2_pipe) is SD2
    assert family_for(str(tiny_model_folder)) is SD1


@pytest.mark.parametrize("class_name", ["KandinskyPipeline", "PixArtAlphaPipeline"])
def test_unsupported_pipeline_class_is_refused_from_model_index_alone(tmp_path, class_name):
    folder = fake_pipeline_folder(tmp_path / "m", class_name)
    for load in (family_for, load_pipeline, load_text_components):
        t = time.perf_counter()
        with pytest.raises(ModelLoadError) as e:
            load(folder)
        assert time.perf_counter() - t < 2.0  # nothing was loaded
        msg = str(e.value)
        assert len(msg.splitlines()) == 1 and repr(folder) in msg and f"is a {class_name}," in msg
        assert (
            "supported: FluxPipeline (flux), StableDiffusion3Pipeline (sd3),"
            " StableDiffusionPipeline (sd1, sd2), StableDiffusionXLPipeline (sdxl)" in msg
        )


def test_a_stable_diffusion_pipeline_of_no_family_is_refused(tmp_path):
    folder = fake_pipeline_folder(tmp_path / "m", "StableDiffusionPipeline", pad_token="<pad>")
    with pytest.raises(ModelLoadError, match="of no supported family .*sd1: .*sd2: ") as e:
        load_pipeline(folder)
    assert len(str(e.value).splitlines()) == 1 and repr(folder) in str(e.value)


def test_model_index_without_a_class_or_not_json(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model_index.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="names no pipeline class"):
        family_for(str(tmp_path / "m"))
    (tmp_path / "m" / "model_index.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="model_index.json cannot be read"):
        family_for(str(tmp_path / "m"))


def test_unreachable_hub_id_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as e:
        family_for("mace-ray-tests/no-such-model")
    msg = str(e.value)
    assert len(msg.splitlines()) == 1
    assert msg.startswith("model 'mace-ray-tests/no-such-model': model_index.json cannot be fetched")


# ---------------------------------------------------------------- padding rule

# The id each family's tokenizer pads with: CLIP's end-of-text, or OpenCLIP's '!'.
PAD_ID = {"sd1": 49407, "sd2": 0}


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_family_states_its_tokenizers_pad_token(tiny_pipe, tiny_sd2_pipe, name):
    family = family_named(name)
    tok = {"sd1": tiny_pipe, "sd2": tiny_sd2_pipe}[name].tokenizer
    assert (tok.pad_token, tok.pad_token_id) == (family.pad_token, PAD_ID[name])
    padded = tok("a dog", padding="max_length", max_length=77).input_ids
    assert padded[4:] == [PAD_ID[name]] * 73  # start, a, dog, end-of-text, then padding


# Prompts with a literal '!': SD 2.x's tokenizer gives it the pad token's id (0) too.
PAIRS = [
    ("a photo of Bill Clinton!", "a photo of a man!"),
    ("Bill Clinton! at the beach", "a man! at the beach"),
    ("a portrait of Bill Clinton", "a portrait of a man wearing a hat"),
]


@pytest.mark.parametrize(("concept_prompt", "anchor_prompt"), PAIRS)
@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_alignment_pairs_padding_in_order_whatever_the_pad_token(
    tiny_pipe, tiny_sd2_pipe, name, concept_prompt, anchor_prompt
):
    pipe = {"sd1": tiny_pipe, "sd2": tiny_sd2_pipe}[name]
    family = family_named(name)
    enc = family.prompt_encoder(family.text_components(pipe), CPU)
    f, g = enc.ids(concept_prompt), enc.ids(anchor_prompt)
    al = align_tokens(f, g, enc.max_length)

    def padded(p: str) -> list[int]:  # what encode() feeds the text encoder
        return enc.tokenizer(p, padding="max_length", max_length=enc.max_length).input_ids

    fp, gp = padded(concept_prompt), padded(anchor_prompt)
    pairs = list(zip(al.concept_positions, al.anchor_positions, strict=True))
    # Every pair is one role: the same token in both prompts, the end-of-text tokens together.
    assert all(fp[i] == gp[j] for i, j in pairs)
    assert (len(f) - 1, len(g) - 1) in pairs
    # After both end-of-text tokens, padding pairs with padding, in order.
    pads = [(i, j) for i, j in pairs if i >= len(f) and j >= len(g)]
    assert pads == [(len(f) + n, len(g) + n) for n in range(enc.max_length - max(len(f), len(g)))]
    assert {fp[i] for i, _ in pads} == {gp[j] for _, j in pads} == {PAD_ID[name]}
    assert [f[i] for i in al.concept_tokens] == enc.ids("Bill Clinton")[1:-1]


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_eq3_token_mask_is_the_concept_then_end_of_text_and_padding(tiny_pipe, tiny_sd2_pipe, name):
    pipe = {"sd1": tiny_pipe, "sd2": tiny_sd2_pipe}[name]
    family = family_named(name)
    enc = family.prompt_encoder(family.text_components(pipe), CPU)
    prompt = "Bill Clinton! waving!! at the crowd"
    padded = enc.tokenizer(prompt, padding="max_length", max_length=enc.max_length).input_ids
    eot = padded.index(enc.tokenizer.eos_token_id)
    # SD 2.x's tokenizer gives a prompt's '!' the pad token's id: a mask by id would take
    # them for padding.
    in_prompt = [i for i in range(eot) if padded[i] == PAD_ID[name]]
    assert len(in_prompt) == (3 if name == "sd2" else 0)
    mask = loss_token_mask(enc, prompt, CLINTON, penalize_eot=True)
    concept = concept_token_mask(enc, prompt, CLINTON)
    expected = torch.arange(enc.max_length) >= eot  # end-of-text and everything after it
    assert torch.equal(mask & ~concept, expected)


# ---------------------------------------------------------------- prediction type


def test_generation_keeps_the_v_prediction_of_sd2():
    pipe = build_tiny_sd2()
    assert type(pipe.scheduler).__name__ == "DDIMScheduler" and SD2.prediction_type(pipe) == "v_prediction"
    v = SD2.generate(pipe, ["a dog"], [7], 32, 32, 2, 7.5)
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler)
    assert (
        pipe.scheduler.config.prediction_type == "v_prediction"
        and SD2.prediction_type(pipe) == "v_prediction"
    )
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    # The prediction type matters: read as epsilon, the same seed gives another image.
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, prediction_type="epsilon")
    eps = SD2.generate(pipe, ["a dog"], [7], 32, 32, 2, 7.5)
    assert v.shape == eps.shape == (1, 32, 32, 3) and v.dtype == np.uint8
    assert np.abs(v.astype(int) - eps.astype(int)).mean() > 1.0


def test_sd1_stays_epsilon(tiny_pipe):
    assert SD1.prediction_type(tiny_pipe) == "epsilon"
