"""LoRA training per concept with the attention loss (Eq. 3) and CFIS (Eq. 5), MACE Sec. 3.2.

K concepts with the same resolved settings train together in one UNet batch, sample j
carrying adapter j. Each concept draws its images, prompts, timesteps and noise from its
own generator, so its adapter is the same whatever batch it lands in.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from mace_core.attention import cross_attention_probes
from mace_core.attention_loss import attention_loss
from mace_core.cfis import sample_timesteps
from mace_core.concepts import Concept
from mace_core.errors import ConceptError
from mace_core.lora import LoraBank, LoraFactors
from mace_core.models import attn2_projections
from mace_core.settings import ResolvedTrain, TrainSettings
from mace_core.text_stats import TextEncoder


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


def find_subsequence(ids: list[int], sub: list[int]) -> int:
    for i in range(len(ids) - len(sub) + 1):
        if ids[i : i + len(sub)] == sub:
            return i
    return -1


def loss_token_mask(encoder: TextEncoder, prompt: str, concept: Concept, penalize_eot: bool) -> torch.Tensor:
    """Token positions whose attention Eq. 3 suppresses: the concept's tokens (and EOT/padding)."""
    ids = encoder.ids(prompt)
    sub = encoder.ids(concept.text)[1:-1]  # without start/end tokens
    start = find_subsequence(ids, sub)
    if start < 0:
        raise ConceptError(f"concept {concept.text!r}: its tokens are not found in prompt {prompt!r}")
    mask = torch.zeros(encoder.max_length, dtype=torch.bool)
    mask[start : start + len(sub)] = True
    if penalize_eot:
        mask[len(ids) - 1 :] = True  # end-of-text and all padding after it
    return mask


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """VAE posterior means of the images, scaled as the UNet expects (encoded once, reused)."""
    dtype = next(vae.parameters()).dtype
    lat = vae.encode(images.to(device, dtype)).latent_dist.mode()
    return (lat * vae.config.scaling_factor).float()


def draw_sample(
    g: torch.Generator,
    latents: torch.Tensor,
    n_prompts: int,
    alphas: torch.Tensor,
    cfis: bool,
    settings: TrainSettings,
) -> tuple[int, int, torch.Tensor, torch.Tensor]:
    """One training draw from a concept's own generator: image i, prompt p, timestep t
    (CFIS, Eq. 5, or uniform) and the noised latent x_t ~ q(x_t | x_0)."""
    i = int(torch.randint(len(latents), (1,), generator=g))
    p = int(torch.randint(n_prompts, (1,), generator=g))
    t = sample_timesteps(1, g, cfis, settings.cfis_t1, settings.cfis_t2, settings.cfis_gamma, len(alphas)).to(
        latents.device
    )
    noise = torch.randn(latents.shape[1:], generator=g).to(latents.device)
    a = alphas[t].view(1, 1, 1)
    return i, p, t, a.sqrt() * latents[i] + (1 - a).sqrt() * noise


def train_loras(
    unet,
    vae,
    noise_scheduler,
    encoder: TextEncoder,
    jobs: list[TrainJob],
    settings: TrainSettings,
    resolved: ResolvedTrain,
    device: torch.device,
    autocast: torch.dtype | None = None,
) -> list[TrainResult]:
    """Train one LoRA per job, all jobs in one UNet batch (per-sample LoRA, exact gradients).

    The UNet must already carry the CFR-refined weights W'. Only the adapters train: the
    UNet's own parameters are never handed to the optimizer and stay unchanged.
    ``autocast`` (bf16 on GPUs) runs the forward pass in that precision; the adapters,
    their gradients and AdamW's state stay float32, the loss is summed in float32.
    """
    if not jobs:
        return []
    k = len(jobs)
    projs = attn2_projections(unet)
    shapes = {key: tuple(m.weight.shape) for key, m in projs.items()}
    gens = [torch.Generator().manual_seed(concept_seed(settings.seed, j.concept, "train")) for j in jobs]
    init_gens = [torch.Generator().manual_seed(concept_seed(settings.seed, j.concept, "init")) for j in jobs]
    bank = LoraBank(shapes, k, settings.rank, init_gens, device)
    bank.slot = torch.arange(k, device=device)

    latents = [encode_latents(vae, j.images, device) for j in jobs]
    latent_hw = tuple(latents[0].shape[-2:])
    embeds = [encoder.encode(j.prompts).to(device) for j in jobs]
    tok_masks = [
        torch.stack([loss_token_mask(encoder, p, j.concept, settings.penalize_eot) for p in j.prompts]).to(
            device
        )
        for j in jobs
    ]
    masks = [j.masks.to(device) for j in jobs]
    alphas = noise_scheduler.alphas_cumprod.to(device)

    params = list(bank.parameters())
    opt = torch.optim.AdamW(params, lr=resolved.lr, weight_decay=settings.weight_decay)
    results = [TrainResult(LoraFactors({})) for _ in jobs]
    unet_dtype = next(unet.parameters()).dtype
    with cross_attention_probes(unet, bank) as store:
        for _ in range(resolved.steps):
            x, t, c, m, tm = [], [], [], [], []
            for j in range(k):
                i, p, tj, xj = draw_sample(
                    gens[j], latents[j], len(embeds[j]), alphas, resolved.cfis, settings
                )
                x.append(xj)
                t.append(tj)
                c.append(embeds[j][p])
                m.append(masks[j][i])
                tm.append(tok_masks[j][p])
            store.clear()
            with torch.autocast(device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
                unet(
                    torch.stack(x).to(unet_dtype),
                    torch.cat(t),
                    encoder_hidden_states=torch.stack(c).to(unet_dtype),
                )
            losses = attention_loss(store, torch.stack(m), torch.stack(tm), latent_hw, settings.squared_loss)
            losses.sum().backward()
            bank.clip_grad_per_adapter(settings.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            for j, v in enumerate(losses.detach().cpu().tolist()):
                results[j].losses.append(v)
    store.clear()
    for j in range(k):
        results[j].lora = bank.factors(j)
    return results


@torch.no_grad()
def evaluate_attention_loss(
    unet,
    vae,
    noise_scheduler,
    encoder: TextEncoder,
    job: TrainJob,
    settings: TrainSettings,
    lora: LoraFactors | None,
    device: torch.device,
    n: int = 16,
) -> float:
    """Mean Eq. 3 loss over n fixed (image, prompt, t, noise) draws, with or without a LoRA."""
    projs = attn2_projections(unet)
    shapes = {key: tuple(m.weight.shape) for key, m in projs.items()}
    bank = LoraBank(shapes, 1, settings.rank, [torch.Generator().manual_seed(0)], device)
    if lora is not None:
        for key, (A, B) in lora.factors.items():
            bank.A[bank.index[key]].data[0] = A.to(device)
            bank.B[bank.index[key]].data[0] = B.to(device)
    bank.slot = torch.zeros(1, dtype=torch.long, device=device)
    g = torch.Generator().manual_seed(concept_seed(settings.seed, job.concept, "eval"))
    lat = encode_latents(vae, job.images, device)
    emb = encoder.encode(job.prompts).to(device)
    alphas = noise_scheduler.alphas_cumprod.to(device)
    total = 0.0
    with cross_attention_probes(unet, bank) as store:
        for _ in range(n):
            i, p, t, x = draw_sample(g, lat, len(emb), alphas, True, settings)
            store.clear()
            unet(x[None], t, encoder_hidden_states=emb[p][None])
            tm = loss_token_mask(encoder, job.prompts[p], job.concept, settings.penalize_eot)[None].to(device)
            total += float(attention_loss(store, job.masks[i][None].to(device), tm, tuple(lat.shape[-2:]))[0])
    return total / n
