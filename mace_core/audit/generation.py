"""Images of an attack's prompt: the family's own generation, the prompt's embeddings injected.

An attack's prompt may carry learned input embeddings that no text can spell, so images are
made by the family's ordinary generation (``ModelFamily.generate``) of the concept type's
generation template filled with the prompt's word, while ``TokenEncoder.injected`` gives the
word's tokens those embeddings in every text encoder: the pipeline's own prompt encoding
(context, pooled embeddings, the empty negative prompt of classifier-free guidance) then
carries them as it would carry a vocabulary word. Every image has its own seed and its
initial noise drawn in fp32 on the CPU, as in erase and eval: image j of a concept has the
same seed for every attack and for the plain prompts, so their images differ only by the
prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import numpy as np
import torch

from mace_core.audit.embedding import AttackPrompt, TokenEncoder
from mace_core.concepts import Concept
from mace_core.evaluation.generation import native_size
from mace_core.evaluation.settings import GenerationSettings
from mace_core.families import family_of_pipeline
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
    size = settings.resolution or native_size(pipe)
    words = [prompt.fill(GENERATION_PROMPTS[concept.type])]
    half = settings.precision == Precision.AUTO and text.device.type == "cuda"
    out: list[np.ndarray] = []
    for start in range(0, len(seeds), settings.batch_size):
        chunk = list(seeds[start : start + settings.batch_size])
        with (
            torch.autocast("cuda", dtype=torch.float16) if half else nullcontext(),
            text.injected(prompt, words),
        ):
            images = family.generate(
                pipe,
                words * len(chunk),
                chunk,
                size,
                size,
                settings.inference_steps,
                settings.guidance_scale,
            )
        out.append(images)
        progress("images", min(start + len(chunk), len(seeds)), len(seeds))
    return np.concatenate(out) if out else np.zeros((0, size, size, 3), np.uint8)
