"""CPU workers of the text statistics: they load only the tokenizer and text encoder.

The statistics of Eq. 1-2 and 7 (per concept, the prior C_p, the domain and retained
sets) need nothing but the text encoder, so they run on cheap CPU actors instead of
holding a GPU worker (and its UNet, VAE and masker) for them. The local executor runs
one in this process.
"""

from __future__ import annotations

from typing import Any

import torch

from mace_core.concepts import Concept
from mace_core.families.base import PromptEncoder
from mace_core.models import TINY_MODEL, load_prompt_encoder, pick_device
from mace_core.text_stats import (
    concept_text_stats,
    prompt_second_moment,
    second_moment_bytes,
    second_moment_from_bytes,
)
from mace_ray import artefacts
from mace_ray.logs import quiet_libraries
from mace_ray.models_remote import TEXT_COMPONENTS, resolve_model
from mace_ray.prior import write_prior_cache
from mace_ray.runtime import where_am_i
from mace_ray.stores import open_storage
from mace_ray.workers import RunSpec, load_checked


class TextWorker:
    """Tokenizer + text encoder of the run's model; serves the text statistics jobs."""

    def __init__(self, spec: RunSpec, name: str) -> None:
        # Nothing that can fail on bad input happens here (under Ray, an error in __init__
        # loses its message); setup() reports it like any other call.
        self.spec = spec
        self.name = name

    def setup(self) -> dict[str, Any]:
        """Load the text side of the model once; returns where this worker runs."""
        quiet_libraries()
        spec = self.spec
        self.storage = open_storage(spec.output, s3_endpoint=spec.s3_endpoint)
        self.layout = spec.layout
        # Under Ray these actors hold no GPU; the local executor uses the run's device.
        self.device = torch.device("cpu") if spec.metrics == "ray" else pick_device(spec.device)

        def load() -> PromptEncoder:  # an s3:// model: its text components fetched first
            return load_prompt_encoder(
                resolve_model(spec.model, spec.s3_endpoint, components=TEXT_COMPONENTS), self.device
            )

        # The tiny model is built from code, not read from files: nothing to check.
        self.encoder = load() if spec.model == TINY_MODEL else load_checked(spec, load)
        return where_am_i(self.name)

    def text_stats(self, concepts: list[Concept]) -> int:
        """CFR and fusion statistics per concept, written per concept; returns how many were new."""
        n = 0
        for c in concepts:
            if self.storage.exists(self.layout.stats(c.slug)):
                continue
            stats = concept_text_stats(self.encoder, c, self.spec.settings.prompts_per_concept)
            artefacts.write_text_stats(self.storage, self.layout, c.slug, stats)
            n += 1
        return n

    def prior_stats(self, captions: list[str]) -> int:
        """Build C_p from the captions into the shared cache; returns its token count."""
        return write_prior_cache(self.storage, self.encoder, captions, self.spec.prior_key)[0]

    def prompt_stats(self, key: str, prompts: list[str]) -> int:
        """The second moment of ``prompts`` (domain set C_d, retained set C_r) stored at ``key``
        of the run's folder unless there; returns its token count."""
        what = f"{self.storage.url}/{key}"
        if artefacts.reusable(self.storage, key, lambda b: second_moment_from_bytes(b, what)):
            return second_moment_from_bytes(self.storage.read_bytes(key), what).n
        stats = prompt_second_moment(self.encoder, prompts)
        self.storage.write_bytes(key, second_moment_bytes(stats))
        return stats.n

    def teardown(self) -> None:
        self.encoder = None  # type: ignore[assignment]
