"""Reading and writing a run's artefacts through a Storage (formats only, no maths).

Tensors are safetensors, images and masks PNG, notes JSON. A concept's DONE marker is
written after every other file of the concept.
"""

from __future__ import annotations

import numpy as np
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from mace_core.concept_job import ConceptArtefacts, ConceptData
from mace_core.concepts import Concept
from mace_core.errors import ArtefactError
from mace_core.imageio import png_bytes, read_png
from mace_core.lora import LoraFactors
from mace_core.text_stats import ConceptTextStats
from mace_ray.layout import RunLayout
from mace_ray.storage import Storage, read_json, write_json


def slugs_with(storage: Storage, layout: RunLayout, name: str) -> set[str]:
    """Slugs of the concepts whose folder holds file ``name`` (one listing of the concepts)."""
    prefix = layout.concepts + "/"
    out = set()
    for k in storage.list(layout.concepts):
        slug, _, rest = k[len(prefix) :].partition("/")
        if rest == name:
            out.add(slug)
    return out


def done_slugs(storage: Storage, layout: RunLayout) -> set[str]:
    """Slugs whose DONE marker exists."""
    return slugs_with(storage, layout, "DONE")


def write_text_stats(storage: Storage, layout: RunLayout, slug: str, stats: ConceptTextStats) -> None:
    storage.write_bytes(
        layout.stats(slug), st_save({k: v.contiguous() for k, v in stats.to_tensors().items()})
    )


def read_text_stats(storage: Storage, layout: RunLayout, slug: str) -> ConceptTextStats:
    key = layout.stats(slug)
    try:
        return ConceptTextStats.from_tensors(st_load(storage.read_bytes(key)))
    except ArtefactError:
        raise
    except Exception as e:
        raise ArtefactError(f"{storage.url}/{key} is not readable: {e}") from None


def write_data(storage: Storage, layout: RunLayout, data: ConceptData) -> None:
    """Images and masks, then data.json: the marker that the training data is complete."""
    slug = data.concept.slug
    for i, (im, m) in enumerate(zip(data.images, data.masks, strict=True)):
        storage.write_bytes(layout.image(slug, i), png_bytes(im))
        storage.write_bytes(layout.mask(slug, i), png_bytes(m))
    write_json(storage, layout.data_notes(slug), {"images": len(data.images), **data.notes})


def read_data(storage: Storage, layout: RunLayout, concept: Concept) -> ConceptData | None:
    """A concept's stored images and masks (paired by index), or None if not complete."""
    key = layout.data_notes(concept.slug)
    if not storage.exists(key):
        return None
    notes = read_json(storage, key)
    pair = read_images(storage, layout, concept.slug, int(notes.pop("images")))
    if pair is None:
        return None
    return ConceptData(concept, pair[0], pair[1], notes)


def write_result(storage: Storage, layout: RunLayout, art: ConceptArtefacts) -> None:
    """LoRA and notes, then the DONE marker. The concept's data must already be stored."""
    slug = art.concept.slug
    storage.write_bytes(layout.lora(slug), art.lora.to_bytes({"concept": art.concept.text}))
    notes = {"concept": art.concept.to_dict(), "losses": art.losses, **art.notes}
    write_json(storage, layout.notes(slug), notes)
    write_json(storage, layout.done(slug), {"concept": art.concept.text, "images": len(art.images)})


def read_lora(storage: Storage, layout: RunLayout, slug: str) -> LoraFactors:
    key = layout.lora(slug)
    return LoraFactors.from_bytes(storage.read_bytes(key), f"{storage.url}/{key}")


def read_notes(storage: Storage, layout: RunLayout, slug: str) -> dict:
    return read_json(storage, layout.notes(slug))


def read_images(
    storage: Storage, layout: RunLayout, slug: str, n: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """Stored images and masks of a concept, paired by index; None if any is missing."""
    ims, ms = [], []
    for i in range(n):
        ik, mk = layout.image(slug, i), layout.mask(slug, i)
        if not (storage.exists(ik) and storage.exists(mk)):
            return None
        ims.append(read_png(storage.read_bytes(ik), f"{storage.url}/{ik}"))
        ms.append(read_png(storage.read_bytes(mk), f"{storage.url}/{mk}", mask=True))
    return np.stack(ims), np.stack(ms)
