"""LoRA training per concept with the attention loss (Eq. 3) and CFIS (Eq. 5), MACE Sec. 3.2.

K concepts with the same resolved settings train together in one UNet batch, sample j
carrying adapter j. Each concept draws its images, prompts, timesteps and noise from its
own generator, so its adapter is the same whatever batch it lands in.

The denoiser is a family's (an SD UNet, a FLUX.1 / SD 3.x transformer): the projections the
adapters sit on, the attention probes, the call and how latents are noised come from the
family's PromptEncoder and training schedule (``mace_core.noise``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from mace_core.attention_loss import attention_loss
from mace_core.cfis import sample_timesteps
from mace_core.concepts import Concept
from mace_core.errors import ConceptError
from mace_core.families.base import PromptEncoder, conditioning_to, stack_rows
from mace_core.lora import LoraBank, LoraFactors
from mace_core.noise import training_schedule
from mace_core.progress import Progress, no_progress
from mace_core.projections import Projections, pad_columns
from mace_core.settings import ResolvedTrain, TrainSettings


@dataclass
class TrainJob:
    """One concept's training inputs: images in [-1, 1] (N, 3, H, W), masks (N, H, W) bool."""

    concept: Concept
    images: torch.Tensor
    masks: torch.Tensor
    prompts: list[str]


@dataclass
class TrainResult:
    lora: LoraFactors
    losses: list[float] = field(default_factory=list)  # per step, before the update


def concept_seed(base: int, concept: Concept, purpose: str) -> int:
    """A seed derived from the concept text, stable across machines and batch layouts."""
    h = hashlib.sha256(f"{base}\0{purpose}\0{concept.key}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def concept_token_mask(encoder: PromptEncoder, prompt: str, concept: Concept) -> torch.Tensor:
    """(tokens,) bool: every position of every occurrence of the concept's tokens in the
    text the denoiser attends to (``PromptEncoder.concept_mask``)."""
    mask = encoder.concept_mask(prompt, concept.text)
    if mask is None:
        raise ConceptError(f"concept {concept.text!r}: its tokens are not found in prompt {prompt!r}")
    return mask


def loss_token_mask(
    encoder: PromptEncoder, prompt: str, concept: Concept, penalize_eot: bool
) -> torch.Tensor:
    """Token positions whose attention Eq. 3 suppresses: every occurrence of the concept's
    tokens (and, with ``penalize_eot``, end-of-text and the padding after it)."""
    mask = concept_token_mask(encoder, prompt, concept)
    return mask | encoder.end_mask(prompt) if penalize_eot else mask


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """VAE posterior means of the images, shifted and scaled as the denoiser expects (encoded
    once, reused): (z - shift_factor) * scaling_factor; SD's VAEs have no shift."""
    dtype = next(vae.parameters()).dtype
    lat = vae.encode(images.to(device, dtype)).latent_dist.mode()
    shift = vae.config.get("shift_factor")
    if shift:
        lat = lat - shift
    return (lat * vae.config.scaling_factor).float()


def padded_factors(factors: LoraFactors, projections: Projections, component: str) -> LoraFactors:
    """A bank's factors (A at each layer's width) with A in the closed forms' token-state
    space (``LoraFactors``): zero outside the columns its layer reads."""
    columns = {k: c for k, c in projections.columns().items() if k in factors.factors}
    out = {
        k: ((pad_columns(A, columns[k][:2], columns[k][2]) if k in columns else A), B)
        for k, (A, B) in factors.factors.items()
    }
    return LoraFactors(out, component, columns)


def draw(
    g: torch.Generator,
    n_images: int,
    n_prompts: int,
    latent_shape: torch.Size,
    n_timesteps: int,
    cfis: bool,
    settings: TrainSettings,
) -> tuple[int, int, torch.Tensor, torch.Tensor]:
    """One training draw on the CPU from a concept's own generator: image i, prompt p,
    timestep t (CFIS, Eq. 5, or uniform) and the noise of x_t. Always in this order, so a
    concept's draws are the same whether made one at a time or all ahead."""
    i = int(torch.randint(n_images, (1,), generator=g))
    p = int(torch.randint(n_prompts, (1,), generator=g))
    t = sample_timesteps(1, g, cfis, settings.cfis_t1, settings.cfis_t2, settings.cfis_gamma, n_timesteps)
    noise = torch.randn(latent_shape, generator=g)
    return i, p, t, noise


def train_loras(
    unet,
    vae,
    noise_scheduler,
    encoder: PromptEncoder,
    jobs: list[TrainJob],
    settings: TrainSettings,
    resolved: ResolvedTrain,
    device: torch.device,
    autocast: torch.dtype | None = None,
    progress: Progress = no_progress,
) -> list[TrainResult]:
    """Train one LoRA per job, all jobs in one UNet batch (per-sample LoRA, exact gradients).

    The UNet (the family's denoiser) must already carry the CFR-refined weights W'. Only the
    adapters train: the UNet's own parameters are never handed to the optimizer and stay
    unchanged. ``noise_scheduler``: a DDPM scheduler or the family's ``training_schedule``.
    ``autocast`` (bf16 on GPUs) runs the forward pass in that precision; the adapters,
    their gradients and AdamW's state stay float32, the loss is summed in float32.
    """
    if not jobs:
        return []
    k = len(jobs)
    projections = encoder.edited_projections(unet)
    shapes = {key: tuple(m.weight.shape) for key, m in projections.trained().items()}
    gens = [torch.Generator().manual_seed(concept_seed(settings.seed, j.concept, "train")) for j in jobs]
    init_gens = [torch.Generator().manual_seed(concept_seed(settings.seed, j.concept, "init")) for j in jobs]
    bank = LoraBank(shapes, k, settings.rank, init_gens, device, settings.lora_init)
    bank.slot = torch.arange(k, device=device)

    latents = [encode_latents(vae, j.images, device) for j in jobs]
    latent_hw = tuple(latents[0].shape[-2:])
    conds = [conditioning_to(encoder.conditioning(j.prompts), device) for j in jobs]
    tok_masks = [
        torch.stack([loss_token_mask(encoder, p, j.concept, settings.penalize_eot) for p in j.prompts]).to(
            device
        )
        for j in jobs
    ]
    masks = [j.masks.to(device) for j in jobs]
    schedule = training_schedule(noise_scheduler).to(device)

    # Every step's draws made ahead (each concept from its own generator, in draw's order)
    # and copied to the device once: a copy from pageable CPU memory per step would make the
    # CPU wait for the GPU at every step.
    ahead = [
        [
            draw(
                gens[j],
                len(latents[j]),
                len(jobs[j].prompts),
                latents[j].shape[1:],
                schedule.num_timesteps,
                resolved.cfis,
                settings,
            )
            for _ in range(resolved.steps)
        ]
        for j in range(k)
    ]
    if resolved.steps:
        all_t = torch.stack([torch.cat([d[2] for d in a]) for a in ahead], dim=1).to(device)  # (steps, K)
        all_noise = torch.stack([torch.stack([d[3] for d in a]) for a in ahead], dim=1).to(device)

    params = list(bank.parameters())
    opt = torch.optim.AdamW(params, lr=resolved.lr, weight_decay=settings.weight_decay)
    results = [TrainResult(LoraFactors({})) for _ in jobs]
    unet_dtype = next(unet.parameters()).dtype
    history: list[torch.Tensor] = []  # per step (K,) losses, kept on the device until the end
    with encoder.memory_saving(unet, device), encoder.attention_probes(unet, bank) as store:
        for step in range(resolved.steps):
            i = [a[step][0] for a in ahead]
            p = [a[step][1] for a in ahead]
            t = all_t[step]
            x0 = torch.stack([latents[j][i[j]] for j in range(k)])
            x = schedule.noised(x0, t, all_noise[step])
            c = conditioning_to(stack_rows(conds, p), unet_dtype)
            m = torch.stack([masks[j][i[j]] for j in range(k)])
            tm = torch.stack([tok_masks[j][p[j]] for j in range(k)])
            store.clear()
            with torch.autocast(device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
                encoder.unet_forward(unet, x.to(unet_dtype), schedule.model_time(t), c)
            losses = attention_loss(store, m, tm, latent_hw, settings.squared_loss)
            losses.sum().backward()
            bank.clip_grad_per_adapter(settings.grad_clip)
            progress("train steps", step + 1, resolved.steps)
            opt.step()
            opt.zero_grad(set_to_none=True)
            history.append(losses.detach().float())
    if history:
        per_step = torch.stack(history).cpu().tolist()  # the one wait for the GPU
        for j in range(k):
            results[j].losses = [row[j] for row in per_step]
    store.clear()
    for j in range(k):
        results[j].lora = padded_factors(bank.factors(j), projections, encoder.component)
    return results
