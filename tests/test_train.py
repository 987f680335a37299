"""LoRA training with the attention loss on the tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from helpers import evaluate_attention_loss

from mace_core.attention import cross_attention_probes
from mace_core.attn2 import attn2_projections
from mace_core.concepts import Concept, ConceptType
from mace_core.datagen import generate_images, images_to_tensor
from mace_core.prompts import concept_prompts
from mace_core.settings import DataSettings, TrainSettings
from mace_core.train import TrainJob, loss_token_mask, train_loras

CPU = torch.device("cpu")
CLINTON = Concept("Bill Clinton", ConceptType.CELEBRITY, "a person")
DOG = Concept("dog", ConceptType.OBJECT, "scene")


def job(pipe, concept, n_images=2, masks=None):
    images = generate_images(pipe, [concept], DataSettings(images_per_concept=n_images, inference_steps=3))[0]
    m = masks if masks is not None else np.ones(images.shape[:3], dtype=bool)
    return TrainJob(concept, images_to_tensor(images), torch.from_numpy(m), concept_prompts(concept)[:6])


def run(pipe, encoder, jobs, settings):
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    return train_loras(
        pipe.unet, pipe.vae, sched, encoder, jobs, settings, settings.resolve(CLINTON.type), CPU
    )


def test_probe_probabilities_are_distributions(tiny_pipe):
    unet = tiny_pipe.unet
    x = torch.randn(2, 4, 32, 32)
    c = torch.randn(2, 77, 32)
    with torch.no_grad():
        ref = unet(x, 10, encoder_hidden_states=c).sample
        with cross_attention_probes(unet) as store:
            got = unet(x, 10, encoder_hidden_states=c).sample
    assert len(store) == len(attn2_projections(unet)) // 2  # one entry per attn2 (to_k + to_v)
    for p in store:
        assert p.shape[0] == 2 and p.shape[-1] == 77
        assert torch.allclose(p.sum(-1), torch.ones(()), atol=1e-5)
    # The probe computes the same attention as diffusers' own processor.
    assert torch.allclose(ref, got, atol=1e-5)
    assert not any(type(p).__name__ == "CrossAttnProbe" for p in unet.attn_processors.values())


def test_training_lowers_loss_and_changes_only_lora(tiny_pipe, encoder):
    j = job(tiny_pipe, CLINTON)
    settings = TrainSettings(lr=3e-2, steps=30)
    sched = DDPMScheduler.from_config(tiny_pipe.scheduler.config)
    before_state = {k: v.clone() for k, v in tiny_pipe.unet.state_dict().items()}
    loss_before = evaluate_attention_loss(
        tiny_pipe.unet, tiny_pipe.vae, sched, encoder, j, settings, None, CPU
    )
    (result,) = run(tiny_pipe, encoder, [j], settings)
    loss_after = evaluate_attention_loss(
        tiny_pipe.unet, tiny_pipe.vae, sched, encoder, j, settings, result.lora, CPU
    )
    assert loss_after < 0.9 * loss_before, (loss_before, loss_after)
    assert len(result.losses) == 30
    # The UNet's own parameters are untouched; the LoRA is not zero.
    after_state = tiny_pipe.unet.state_dict()
    assert before_state.keys() == after_state.keys()
    assert all(torch.equal(before_state[k], after_state[k]) for k in before_state)
    assert any(B.abs().sum() > 0 for _, B in result.lora.factors.values())
    assert set(result.lora.factors) == {k for k in before_state if "attn2.to_k" in k or "attn2.to_v" in k}


AIRPLANE = Concept("airplane", ConceptType.OBJECT, "sky")


@pytest.mark.parametrize(
    "batch",
    [[CLINTON], [CLINTON, DOG, AIRPLANE], [CLINTON, DOG, CLINTON]],  # K = 1, 3, padded with a repeat
    ids=["k1", "k3", "repeat"],
)
def test_batched_training_equals_one_by_one(tiny_pipe, encoder, batch):
    settings = TrainSettings(lr=1e-2, steps=4)
    jobs = [job(tiny_pipe, c) for c in batch]
    batched = run(tiny_pipe, encoder, jobs, settings)
    alone = {}
    for j in jobs:
        if j.concept.text not in alone:
            alone[j.concept.text] = run(tiny_pipe, encoder, [j], settings)[0]
    for j, b in zip(jobs, batched, strict=True):
        a = alone[j.concept.text]
        assert np.allclose(a.losses, b.losses, rtol=1e-5)
        for key, (A, B) in a.lora.factors.items():
            A2, B2 = b.lora.factors[key]
            assert torch.allclose(A, A2, atol=1e-6) and torch.allclose(B, B2, atol=1e-6)


def test_bf16_autocast_training_runs_on_cpu(tiny_pipe, encoder):
    """The GPU path (bf16 autocast, fp32 adapters) also runs on a CPU and stays close to fp32."""
    j = job(tiny_pipe, CLINTON)
    settings = TrainSettings(lr=1e-2, steps=3)
    sched = DDPMScheduler.from_config(tiny_pipe.scheduler.config)
    res = settings.resolve(CLINTON.type)
    (fp32,) = train_loras(tiny_pipe.unet, tiny_pipe.vae, sched, encoder, [j], settings, res, CPU)
    (bf16,) = train_loras(
        tiny_pipe.unet, tiny_pipe.vae, sched, encoder, [j], settings, res, CPU, torch.bfloat16
    )
    for key, (A, B) in bf16.lora.factors.items():
        assert A.dtype == torch.float32 and torch.isfinite(B).all()
        assert torch.allclose(B, fp32.lora.factors[key][1], atol=5e-3)
    assert np.allclose(bf16.losses, fp32.losses, rtol=5e-2)


def test_mask_limits_the_loss(tiny_pipe, encoder):
    empty = job(tiny_pipe, CLINTON, masks=np.zeros((2, 32, 32), dtype=bool))
    sched = DDPMScheduler.from_config(tiny_pipe.scheduler.config)
    loss = evaluate_attention_loss(
        tiny_pipe.unet, tiny_pipe.vae, sched, encoder, empty, TrainSettings(), None, CPU, n=2
    )
    assert loss < 1e-5  # nothing inside the mask: nothing to suppress


def test_loss_tokens(encoder):
    prompt = "a candid photo of Bill Clinton on the street"
    ids = encoder.ids(prompt)
    m = loss_token_mask(encoder, prompt, CLINTON, penalize_eot=False)
    assert [ids[i] for i in m.nonzero().flatten().tolist()] == encoder.ids("Bill Clinton")[1:-1]
    m_eot = loss_token_mask(encoder, prompt, CLINTON, penalize_eot=True)
    assert int(m_eot.sum()) == 2 + 77 - (len(ids) - 1)


def test_loss_tokens_mark_every_occurrence_of_the_concept(encoder):
    prompt = "Bill Clinton next to a poster of Bill Clinton"
    ids = encoder.ids(prompt)
    sub = encoder.ids("Bill Clinton")[1:-1]
    m = loss_token_mask(encoder, prompt, CLINTON, penalize_eot=False)
    marked = m.nonzero().flatten().tolist()
    assert len(marked) == 2 * len(sub)
    starts = [1, ids.index(sub[0], 1 + len(sub))]
    assert marked == [s + i for s in starts for i in range(len(sub))]
    # "Clinton" alone is not the concept: only whole occurrences are marked.
    lone = loss_token_mask(encoder, "Bill Clinton and Hillary Clinton", CLINTON, penalize_eot=False)
    assert int(lone.sum()) == len(sub)


@pytest.mark.parametrize("rank", [1, 4])
def test_lora_init_statistics(rank):
    from mace_core.lora import LoraBank

    shapes = {"x.attn2.to_k": (320, 768), "x.attn2.to_v": (640, 1024)}
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    bank = LoraBank(shapes, 3, rank, gens, CPU)
    for i, (d_out, d_in) in enumerate(shapes.values()):
        A, B = bank.A[i].detach(), bank.B[i].detach()
        assert A.shape == (3, rank, d_in) and B.shape == (3, d_out, rank)
        assert torch.all(B == 0)  # dW = B A = 0 at the start
        # A ~ N(0, 1/rank^2): mean 0, std 1/rank (768+ draws per adapter: within 10%).
        assert float(A.std()) == pytest.approx(1 / rank, rel=0.1)
        assert abs(float(A.mean())) < 0.1 / rank
    kaiming = LoraBank(shapes, 3, rank, [torch.Generator().manual_seed(s) for s in (1, 2, 3)], CPU, "kaiming")
    A = kaiming.A[0].detach()
    assert float(A.abs().max()) <= 1 / 768**0.5 and float(A.std()) == pytest.approx(
        (3 * 768) ** -0.5, rel=0.1
    )
    # Each adapter from its own generator: the same start alone or among others.
    alone = LoraBank(shapes, 1, rank, [torch.Generator().manual_seed(2)], CPU)
    assert torch.equal(alone.A[1][0], bank.A[1][1])
    with pytest.raises(ValueError, match="init"):
        LoraBank(shapes, 1, rank, [torch.Generator()], CPU, "xavier")
