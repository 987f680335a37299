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

from mace_core import version
from mace_core.concepts import Concept
from mace_core.prompts import generation_prompt
from mace_core.settings import EraseSettings
from mace_ray.storage.keys import Under, safe_part

DATA_ROOT = "data"
_KEY = re.compile(r"^[0-9a-f]{24}$")


def data_key(model_fingerprint: str, concept: Concept, settings: EraseSettings) -> str:
    """The content address of a concept's training images and masks: everything they depend
    on and nothing else. The ORIGINAL model's fingerprint, the concept's text and type (the
    seeds and the masker's text query), the exact generation prompt, the data and mask
    settings, the precision and the method's version (``mace_core.version``). Not the anchor,
    the other concepts, CFR, the training settings or the template files (no image or mask
    is made from a template), so a run that adds concepts, or changes only how LoRAs are
    trained or which templates the statistics use, reuses them."""
    plain = settings.to_dict()
    spec = {
        "model": model_fingerprint,
        "concept": {"text": concept.text, "type": concept.type.value},
        "prompt": generation_prompt(concept),
        "data": plain["data"],
        "masks": plain["masks"],
        "precision": plain["precision"],
        "method": version.METHOD_VERSION,
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

    # Written after the images and masks, with their checksums: they are complete when it exists.
    marker = Under("data.json")

    def image(self, i: int) -> str:
        return f"{self.root}/images/{i:03d}.png"

    def mask(self, i: int) -> str:
        return f"{self.root}/masks/{i:03d}.png"


def prior_cache_path(key: str) -> str:
    return f"cache/prior/{key}.safetensors"


@dataclass(frozen=True)
class RunLayout:
    run_id: str

    manifest = Under("manifest.json")
    report = Under("report.json")
    # The shared artefacts the run uses (``mace-ray gc`` keeps what some run refers to).
    refs = Under("refs.json")
    cfr_matrix = Under("cfr/M.safetensors")
    # C_d: the prompts of the type's domain phrase ("a person").
    domain_stats = Under("cfr/domain.safetensors")
    # C_r: the prompts of the --retain concepts.
    retain_stats = Under("cfr/retain.safetensors")
    concepts = Under("concepts")
    final_pipeline = Under("final/pipeline")
    erasure = Under("final/erasure.safetensors")
    # The CFR-refined matrices W' (Eq. 2) alone: the base the per-concept LoRAs train on.
    cfr_erasure = Under("final/cfr.safetensors")

    @property
    def root(self) -> str:
        return f"runs/{self.run_id}"

    @property
    def lock(self) -> str:
        """Outside the run's folder: --no-resume deletes that folder under the lock."""
        return f"locks/{self.run_id}.json"

    def concept(self, slug: str) -> str:
        return f"{self.concepts}/{safe_part(slug, 'concept slug')}"

    def stats(self, slug: str) -> str:
        return f"{self.concept(slug)}/stats.safetensors"

    def lora(self, slug: str) -> str:
        return f"{self.concept(slug)}/lora.safetensors"

    def notes(self, slug: str) -> str:
        return f"{self.concept(slug)}/notes.json"

    def done(self, slug: str) -> str:
        return f"{self.concept(slug)}/DONE"
