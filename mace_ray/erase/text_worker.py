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
from mace_core.families.model_index import TINY_MODEL
from mace_core.models import load_prompt_encoder
from mace_core.text_stats import (
    concept_text_stats,
    prompt_second_moment,
    second_moment_bytes,
    second_moment_from_bytes,
)
from mace_ray.engine.worker import PoolWorker
from mace_ray.erase import artefacts
from mace_ray.erase.prior import write_prior_cache
from mace_ray.erase.spec import RunSpec, load_checked
from mace_ray.storage.model_cache import TEXT_COMPONENTS
from mace_ray.storage.resolve import Sources


class TextWorker(PoolWorker[RunSpec]):
    """Tokenizer + text encoder of the run's model; serves the text statistics jobs."""

    def choose_device(self) -> torch.device:
        # Under Ray these actors hold no GPU; the local executor uses the run's device.
        return torch.device("cpu") if self.spec.metrics == "ray" else super().choose_device()

    def load(self) -> dict[str, Any]:
        """The text side of the model, once."""
        spec = self.spec
        self.layout = spec.layout

        sources = Sources(spec.s3_endpoint)

        def read_encoder() -> PromptEncoder:  # an s3:// model: its text components fetched first
            return load_prompt_encoder(sources.pipeline(spec.model, TEXT_COMPONENTS), self.device)

        # The tiny model is built from code, not read from files: nothing to check.
        tiny = spec.model == TINY_MODEL
        self.encoder = read_encoder() if tiny else load_checked(spec, sources, read_encoder)
        return {}

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
        super().teardown()
