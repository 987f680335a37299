"""The run layout: every key of a run, in one place.

runs/<run_id>/manifest.json              inputs, settings, versions, status
runs/<run_id>/refs.json                  the shared artefacts the run uses (data keys)
runs/<run_id>/cfr/                       summed statistics and M
runs/<run_id>/concepts/<slug>/           lora.safetensors, stats.safetensors, notes.json, DONE
data/<key>/                              images/, masks/, data.json: a concept's training
                                         data, by content address (``data_key``), shared
                                         by every run that needs the same images
runs/<run_id>/final/pipeline/            diffusers folder
runs/<run_id>/final/erasure.safetensors  the replaced matrices only
runs/<run_id>/final/cfr.safetensors      the CFR-refined matrices (where the LoRAs load)
runs/<run_id>/report.json
cache/prior/<key>.safetensors            prior statistics, shared by runs
locks/<run_id>.json                      the lease of the driver running the run
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

from mace_core.concepts import Concept
from mace_core.settings import EraseSettings

# concept_slug() makes [a-z0-9-] only, so a slug can never leave the concepts folder.
_SLUG = re.compile(r"^[a-z0-9][a-z0-9-]*$")


DATA_ROOT = "data"
_KEY = re.compile(r"^[0-9a-f]{24}$")


def data_key(model_fingerprint: str, concept: Concept, settings: EraseSettings) -> str:
    """The content address of a concept's training images and masks: everything they depend
    on and nothing else. The ORIGINAL model's fingerprint, the concept's text and type (the
    generation prompt, the seeds and the masker's text query), the data and mask settings
    and the precision. Not the anchor, the other concepts, CFR or the training settings, so
    a run that adds concepts, or changes only how LoRAs are trained, reuses them."""
    plain = settings.to_dict()
    spec = {
        "model": model_fingerprint,
        "concept": {"text": concept.text, "type": concept.type.value},
        "data": plain["data"],
        "masks": plain["masks"],
        "precision": plain["precision"],
        "layout": 1,  # bump when the stored format of the data changes
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:24]


@dataclass(frozen=True)
class DataLayout:
    """Where one concept's training data lives (``data/<key>/``), shared by runs."""

    key: str

    def __post_init__(self) -> None:
        if not _KEY.match(self.key):
            raise ValueError(f"unsafe data key {self.key!r}")

    @property
    def root(self) -> str:
        return f"{DATA_ROOT}/{self.key}"

    @property
    def marker(self) -> str:
        """Written after the images and masks, with their checksums: they are complete when it exists."""
        return f"{self.root}/data.json"

    def image(self, i: int) -> str:
        return f"{self.root}/images/{i:03d}.png"

    def mask(self, i: int) -> str:
        return f"{self.root}/masks/{i:03d}.png"


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
    def refs(self) -> str:
        """The shared artefacts the run uses (``mace-ray gc`` keeps what some run refers to)."""
        return f"{self.root}/refs.json"

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

    def notes(self, slug: str) -> str:
        return f"{self.concept(slug)}/notes.json"

    def done(self, slug: str) -> str:
        return f"{self.concept(slug)}/DONE"

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
