"""The run layout: every key of a run, in one place.

runs/<run_id>/manifest.json              inputs, settings, versions, status
runs/<run_id>/cfr/                       summed statistics and M
runs/<run_id>/concepts/<slug>/           images/, masks/, lora.safetensors,
                                         stats.safetensors, notes.json, DONE
runs/<run_id>/final/pipeline/            diffusers folder
runs/<run_id>/final/erasure.safetensors  the replaced matrices only
runs/<run_id>/final/cfr.safetensors      the CFR-refined matrices (where the LoRAs load)
runs/<run_id>/report.json
cache/prior/<key>.safetensors            prior statistics, shared by runs
locks/<run_id>.json                      the lease of the driver running the run
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# concept_slug() makes [a-z0-9-] only, so a slug can never leave the concepts folder.
_SLUG = re.compile(r"^[a-z0-9][a-z0-9-]*$")


def prior_cache_path(key: str) -> str:
    return f"cache/prior/{key}.safetensors"


@dataclass(frozen=True)
class RunLayout:
    run_id: str

    @property
    def root(self) -> str:
        return f"runs/{self.run_id}"

    @property
    def lock(self) -> str:
        """Outside the run's folder: --no-resume deletes that folder under the lock."""
        return f"locks/{self.run_id}.json"

    @property
    def manifest(self) -> str:
        return f"{self.root}/manifest.json"

    @property
    def report(self) -> str:
        return f"{self.root}/report.json"

    @property
    def cfr_matrix(self) -> str:
        return f"{self.root}/cfr/M.safetensors"

    @property
    def domain_stats(self) -> str:
        """C_d: the prompts of the type's domain phrase ("a person")."""
        return f"{self.root}/cfr/domain.safetensors"

    @property
    def retain_stats(self) -> str:
        """C_r: the prompts of the --retain concepts."""
        return f"{self.root}/cfr/retain.safetensors"

    @property
    def concepts(self) -> str:
        return f"{self.root}/concepts"

    def concept(self, slug: str) -> str:
        if not _SLUG.match(slug):
            raise ValueError(f"unsafe concept slug {slug!r}")
        return f"{self.concepts}/{slug}"

    def stats(self, slug: str) -> str:
        return f"{self.concept(slug)}/stats.safetensors"

    def lora(self, slug: str) -> str:
        return f"{self.concept(slug)}/lora.safetensors"

    def data_notes(self, slug: str) -> str:
        """Written after the concept's images and masks: they are complete when it exists."""
        return f"{self.concept(slug)}/data.json"

    def notes(self, slug: str) -> str:
        return f"{self.concept(slug)}/notes.json"

    def done(self, slug: str) -> str:
        return f"{self.concept(slug)}/DONE"

    def image(self, slug: str, i: int) -> str:
        return f"{self.concept(slug)}/images/{i:03d}.png"

    def mask(self, slug: str, i: int) -> str:
        return f"{self.concept(slug)}/masks/{i:03d}.png"

    @property
    def final_pipeline(self) -> str:
        return f"{self.root}/final/pipeline"

    @property
    def erasure(self) -> str:
        return f"{self.root}/final/erasure.safetensors"

    @property
    def cfr_erasure(self) -> str:
        """The CFR-refined matrices W' (Eq. 2) alone: the base the per-concept LoRAs train on."""
        return f"{self.root}/final/cfr.safetensors"
