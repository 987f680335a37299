"""Images of an attack's prompt: the pipeline conditioned on the attack's token states.

An attack's prompt may carry learned input embeddings that no text can spell, so images are
made from the cross-attention context (``prompt_embeds``) that ``TokenEncoder`` gives for
the concept type's generation template filled with the prompt; the unconditional branch of
classifier-free guidance is the empty prompt's context, as the pipeline makes it. Every
image has its own seed and its initial noise drawn in fp32 on the CPU (``initial_noise``),
as in erase and eval: image j of a concept has the same seed for every attack and for the
plain prompts, so their images differ only by the prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import numpy as np
import torch

from mace_core.audit.embedding import AttackPrompt, TokenEncoder
from mace_core.concepts import Concept
from mace_core.errors import GenerationError
from mace_core.evaluation.generation import GenerationSettings, native_size
from mace_core.families import family_of_pipeline
from mace_core.families.base import initial_noise
from mace_core.progress import Progress, no_progress
from mace_core.prompts import GENERATION_PROMPTS
from mace_core.settings import Precision
from mace_core.train import concept_seed


def image_seeds(seed: int, concept: Concept, n: int) -> list[int]:
    """The seeds of a concept's n audit images: the same for every attack and model."""
    return [concept_seed(seed, concept, f"audit-image-{j}") for j in range(n)]


@torch.no_grad()
def generate(
    pipe,
    text: TokenEncoder,
    concept: Concept,
    prompt: AttackPrompt,
    seeds: Sequence[int],
    settings: GenerationSettings,
    progress: Progress = no_progress,
) -> np.ndarray:
    """uint8 (len(seeds), H, W, 3): ``prompt`` in the concept type's generation template."""
    family = family_of_pipeline(pipe)
    family.use_dpm_solver(pipe)
    size = settings.resolution or native_size(pipe)
    scale = int(pipe.vae_scale_factor)
    shape = (int(pipe.unet.config.in_channels), size // scale, size // scale)
    dtype = pipe.unet.dtype
    context = text.encode([GENERATION_PROMPTS[concept.type]], prompt).to(dtype)
    empty = text.encode_texts([""]).to(dtype)
    device = text.device
    half = settings.precision == Precision.AUTO and device.type == "cuda"
    out: list[np.ndarray] = []
    for start in range(0, len(seeds), settings.batch_size):
        chunk = list(seeds[start : start + settings.batch_size])
        gens = [torch.Generator().manual_seed(s) for s in chunk]
        n = len(chunk)
        with torch.autocast("cuda", dtype=torch.float16) if half else nullcontext():
            images = pipe(
                prompt_embeds=context.expand(n, -1, -1),
                negative_prompt_embeds=empty.expand(n, -1, -1),
                num_inference_steps=settings.inference_steps,
                guidance_scale=settings.guidance_scale,
                latents=initial_noise(gens, shape, dtype),
                generator=gens,
                height=size,
                width=size,
                output_type="np",
            ).images
        if not np.isfinite(images).all():
            raise GenerationError(f"non-finite pixels generating an attack prompt of {concept.text!r}")
        out.append((np.clip(images, 0.0, 1.0) * 255).round().astype(np.uint8))
        progress("images", min(start + n, len(seeds)), len(seeds))
    return np.concatenate(out) if out else np.zeros((0, size, size, 3), np.uint8)
