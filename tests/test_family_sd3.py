"""SD 3.x end to end on a tiny random SD-3-shaped pipeline saved as a diffusers folder (CLIP-L,
CLIP-G and T5 encoders, the T5 tokenizer made from a small corpus, an MMDiT transformer):
recognised from its files, the CLIP + T5 context laid out in two segments, the edited
projections, Eq. 3 on the joint attention, and erase runs local and through Ray with S3,
whose output loads with StableDiffusion3Pipeline and differs only in those projections."""

from __future__ import annotations

from pathlib import Path

import pytest
from mmdit_checks import (
    CLINTON,
    CPU,
    check_eval_and_audit,
    check_images,
    check_output,
    check_probes_and_training,
    check_strength,
    check_t5_segment,
    check_text_side,
    erase,
)

from mace_core.errors import ConceptError
from mace_core.families import family_for, family_named, family_of_pipeline
from mace_core.families.mmdit import CONTEXT_KEY, POOLED_KEY
from mace_core.families.sd3 import build_tiny_pipeline
from mace_core.models import load_pipeline, load_prompt_encoder, pipeline_projections
from mace_core.train import loss_token_mask

SD3 = family_named("sd3")


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model") / "tiny-sd3"
    build_tiny_pipeline().save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def pipe(sd3_folder):
    return load_pipeline(str(sd3_folder))


def test_recognised_loaded_and_both_segments_tokenized(sd3_folder, pipe):
    assert family_for(str(sd3_folder)) is SD3 and family_of_pipeline(pipe) is SD3
    assert type(pipe).__name__ == "StableDiffusion3Pipeline"
    enc = load_prompt_encoder(str(sd3_folder), CPU)
    assert (enc.max_length, enc.tokens, enc.dim) == (24, 77 + 24, 64 + 64)
    check_text_side(SD3, enc, pipe, ["a photo of Bill Clinton!", "a dog"])
    check_t5_segment(enc, pipe.tokenizer_3, offset=77)
    # The CLIP segment: a start token, end-of-text and padding (CLIP-G pads with '!').
    prompt = "a photo of Bill Clinton!"
    ids = enc.ids(prompt)
    mask = loss_token_mask(enc, prompt, CLINTON, penalize_eot=True)[:77]
    assert ids[0] == 49406 and mask[4:6].all() and mask[len(ids) - 1 :].all() and not mask[:4].any()
    al = enc.align(prompt, "a photo of a man!")
    assert set(al.concept_tokens) >= {4, 5} and (0, 0) in zip(
        al.concept_positions, al.anchor_positions, strict=True
    )
    with pytest.raises(ConceptError, match="repeated"):
        enc.ids("hi!!")


def test_edited_projections(pipe):
    projections = pipeline_projections(pipe)
    assert list(projections) == [CONTEXT_KEY, POOLED_KEY] and projections.width == 128
    assert projections[CONTEXT_KEY].columns == (0, 64) and projections[POOLED_KEY].columns == (64, 128)
    # SD 3.5's dual-attention blocks call their image-only self-attention attn2: never edited.
    assert not any(".attn2." in k for k in projections)


def test_probes_and_lora_training(pipe):
    enc = SD3.prompt_encoder(SD3.text_components(pipe), CPU)
    check_probes_and_training(enc, pipe, SD3.training_schedule(pipe))


def test_generation_per_seed(pipe):
    check_images(SD3, pipe)


@pytest.fixture(scope="module")
def local_run(sd3_folder, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("sd3-run")
    return erase(str(sd3_folder), str(tmp / "out"), tmp, executor="local")


def test_default_erase_is_as_strong_as_sd1(local_run):
    check_strength(local_run)


def test_output_loads_and_differs_only_in_the_declared_projections(sd3_folder, local_run):
    from diffusers import StableDiffusion3Pipeline

    check_output(StableDiffusion3Pipeline, sd3_folder, Path(local_run["output"]["root"]))


def test_eval_and_audit_run_on_the_erased_model(local_run, tmp_path):
    check_eval_and_audit(Path(local_run["output"]["root"]), tmp_path, "soft-prompt")


def test_erase_through_ray_from_and_to_s3(aws_env, bucket, sd3_folder, local_run, tmp_path, monkeypatch):
    from helpers import assert_same_erasure, small_local_ray

    from mace_core.checkpoints import read_erasure
    from mace_ray.storage.s3 import S3Storage

    monkeypatch.setenv("MACE_MODEL_CACHE", str(tmp_path / "models"))
    S3Storage(f"s3://{bucket}/models", aws_env.endpoint).put_dir(sd3_folder, "tiny-sd3")
    with small_local_ray(num_gpus=1):
        rep = erase(
            f"s3://{bucket}/models/tiny-sd3",
            f"s3://{bucket}/runs-out",
            tmp_path,
            s3_endpoint=aws_env.endpoint,
            workers=1,
            gpus_per_worker=1,
        )
    assert rep["executor"] == "ray"
    out = S3Storage(f"s3://{bucket}/runs-out", aws_env.endpoint)
    got = read_erasure(out.read_bytes(f"runs/{rep['run_id']}/final/erasure.safetensors"))[0]
    root = Path(local_run["output"]["root"])
    assert_same_erasure(
        got, read_erasure((root / "final" / "erasure.safetensors").read_bytes())[0], atol=1e-5
    )
