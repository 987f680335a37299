"""FLUX.1 end to end on a tiny random FLUX.1-dev-shaped pipeline saved as a diffusers folder
(CLIP-L and T5 encoders, the T5 tokenizer made from a small corpus, an MMDiT transformer):
recognised from its files, T5 tokenization, the edited projections (context_embedder and the
pooled text projection), Eq. 3 on the joint attention, and erase runs local and through Ray
with S3, whose output loads with FluxPipeline and differs only in those projections."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from family_fixtures import tiny_folder_and_pipe
from mmdit_checks import CPU, MMDiTFamilyTests, check_images, check_t5_segment, check_text_side

from mace_core.families import family_for, family_named, family_of_pipeline
from mace_core.families.flux import SCHNELL_STEPS
from mace_core.families.mmdit import CONTEXT_KEY, POOLED_KEY
from mace_core.models import load_prompt_encoder, pipeline_projections

FLUX = family_named("flux")
model_folder, pipe = tiny_folder_and_pipe(FLUX)


def test_recognised_loaded_and_t5_tokenized(model_folder, pipe):
    assert family_for(str(model_folder)) is FLUX and family_of_pipeline(pipe) is FLUX
    assert type(pipe).__name__ == "FluxPipeline" and pipe.transformer.config.guidance_embeds
    enc = load_prompt_encoder(str(model_folder), CPU)  # the text side alone, as CPU workers load it
    assert enc.max_length == enc.tokens == 77 and enc.dim == 32 + 32
    check_text_side(FLUX, enc, pipe, ["a photo of Bill Clinton", "a dog"])
    check_t5_segment(enc, pipe.tokenizer_2, offset=0)


def test_edited_projections_and_their_weights(pipe):
    """context_embedder reads the T5 columns of the token-state space, the pooled projection
    the CLIP columns; statistics weights are zero elsewhere and go back in exactly."""
    projections = pipeline_projections(pipe)
    assert list(projections) == [CONTEXT_KEY, POOLED_KEY] and projections.width == 64
    assert projections[CONTEXT_KEY].columns == (0, 32) and projections[POOLED_KEY].columns == (32, 64)
    assert list(projections.trained()) == [CONTEXT_KEY] and projections.group("pooled") == [POOLED_KEY]
    w = projections.weights()
    own = projections.component_tensors(w)
    assert torch.equal(own[CONTEXT_KEY], pipe.transformer.context_embedder.weight)
    assert not w[CONTEXT_KEY][:, 32:].any() and not w[POOLED_KEY][:, :32].any()
    changed = {k: v * 2 for k, v in w.items()}
    with projections.weights_set(changed):
        assert torch.equal(pipe.transformer.context_embedder.weight, 2 * own[CONTEXT_KEY])
    assert torch.equal(pipe.transformer.context_embedder.weight, own[CONTEXT_KEY])
    assert torch.equal(projections.from_component_tensors(own)[POOLED_KEY], w[POOLED_KEY])


class TestMMDiTFamily(MMDiTFamilyTests):
    """Probes and LoRA training, and the erase runs (tests/mmdit_checks.py)."""

    family = FLUX
    attack = "inversion"


def test_generation_per_seed_and_schnell_steps(pipe):
    check_images(FLUX, pipe)
    noise = torch.zeros(1, 4, 16, 16)
    steps, kwargs = FLUX.pipeline_kwargs(pipe, noise, 28, 3.5)
    assert steps == 28 and kwargs["max_sequence_length"] == 77  # dev: the steps asked for
    assert kwargs["latents"].shape == (1, 64, 16) and kwargs["guidance_scale"] == 3.5
    # schnell (no guidance embedding): its distilled few steps.
    schnell = SimpleNamespace(
        transformer=SimpleNamespace(config=SimpleNamespace(guidance_embeds=False)),
        tokenizer_2=pipe.tokenizer_2,
    )
    assert FLUX.pipeline_kwargs(schnell, noise, 28, 3.5)[0] == SCHNELL_STEPS


def test_cfis_over_flow_matching_noise_levels(pipe):
    """Eq. 5's timesteps noise a latent to the flow level of equal signal-to-noise ratio under
    SD's schedule: x_t = (1 - s) x_0 + s n with ((1 - s) / s)^2 = a_t / (1 - a_t)."""
    from diffusers import DDPMScheduler

    from mace_core.cfis import cfis_density

    schedule = FLUX.training_schedule(pipe)
    a = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod
    s = schedule.sigmas.double()
    assert torch.allclose(((1 - s) / s) ** 2, (a / (1 - a)).double(), rtol=1e-4)
    assert 0.35 < s[200] < 0.37 and 0.53 < s[400] < 0.55 and bool((s[1:] > s[:-1]).all())
    p = cfis_density()
    assert 0.35 < float((p * s).sum()) < 0.55  # CFIS's mass sits on that band
    x0, n, t = torch.ones(1, 4, 2, 2), torch.zeros(1, 4, 2, 2), torch.tensor([400])
    assert torch.allclose(schedule.noised(x0, t, n), (1 - s[400]).float() * x0)
    assert torch.allclose(schedule.model_time(t), s[400].float())  # FLUX takes s; SD 3.x 1000 s
