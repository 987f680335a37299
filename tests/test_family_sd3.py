"""SD 3.x end to end on a tiny random SD-3-shaped pipeline saved as a diffusers folder (CLIP-L,
CLIP-G and T5 encoders, the T5 tokenizer made from a small corpus, an MMDiT transformer):
recognised from its files, the CLIP + T5 context laid out in two segments, the edited
projections, Eq. 3 on the joint attention, and erase runs local and through Ray with S3,
whose output loads with StableDiffusion3Pipeline and differs only in those projections."""

from __future__ import annotations

import pytest
from family_fixtures import tiny_folder_and_pipe
from mmdit_checks import CLINTON, CPU, MMDiTFamilyTests, check_images, check_t5_segment, check_text_side

from mace_core.errors import ConceptError
from mace_core.families import family_for, family_named, family_of_pipeline
from mace_core.families.mmdit import CONTEXT_KEY, POOLED_KEY
from mace_core.models import load_prompt_encoder, pipeline_projections
from mace_core.train import loss_token_mask

SD3 = family_named("sd3")
model_folder, pipe = tiny_folder_and_pipe(SD3)


def test_recognised_loaded_and_both_segments_tokenized(model_folder, pipe):
    assert family_for(str(model_folder)) is SD3 and family_of_pipeline(pipe) is SD3
    assert type(pipe).__name__ == "StableDiffusion3Pipeline"
    enc = load_prompt_encoder(str(model_folder), CPU)
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


class TestMMDiTFamily(MMDiTFamilyTests):
    """Probes and LoRA training, and the erase runs (tests/mmdit_checks.py)."""

    family = SD3
    attack = "soft-prompt"


def test_generation_per_seed(pipe):
    check_images(SD3, pipe)
