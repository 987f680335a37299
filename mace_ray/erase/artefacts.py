"""Reading and writing a run's artefacts through a Storage (formats only, no maths).

Tensors are sealed safetensors (``mace_core.sealed``), images and masks PNG, notes JSON. A
concept's DONE marker is written after every other file of the concept and carries their
checksums, as data.json does for the images and masks: nothing reused is trusted unchecked.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from mace_core.concept_job import ConceptArtefacts, ConceptData
from mace_core.concepts import Concept
from mace_core.errors import ArtefactError
from mace_core.imageio import png_bytes, read_png
from mace_core.lora import LoraFactors
from mace_core.sealed import open_sealed, sealed_bytes
from mace_core.text_stats import ConceptTextStats
from mace_ray.erase.layout import DataLayout, RunLayout
from mace_ray.storage.base import Storage, StorageError, json_bytes, read_json, write_json

log = logging.getLogger("mace_ray")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def mismatch(storage: Storage, sums: dict[str, str], threads: int = 8) -> str | None:
    """What is wrong with the first stored file (by key) that is missing or does not match
    its SHA-256 in ``sums``, or None when they all hold. Files are hashed as they stream
    (``Storage.digest``), several at once: memory stays flat in the size of a model."""

    def problem(key: str) -> str | None:
        if not storage.exists(key):
            return f"{key} is missing"
        if storage.digest(key) != sums[key]:
            return f"{key} does not match its checksum"
        return None

    keys = sorted(sums)
    pool = ThreadPoolExecutor(max_workers=threads)
    try:
        for found in pool.map(problem, keys):
            if found is not None:
                return found  # the rest need not be hashed: cancelled below
        return None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _rel(key: str) -> str:
    """``images/000.png`` of a concept's image key: how data.json names its files."""
    return "/".join(key.rsplit("/", 2)[-2:])


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
        layout.stats(slug), sealed_bytes({k: v.contiguous() for k, v in stats.to_tensors().items()})
    )


def read_text_stats(storage: Storage, layout: RunLayout, slug: str) -> ConceptTextStats:
    key = layout.stats(slug)
    what = f"{storage.url}/{key}"
    return ConceptTextStats.from_tensors(open_sealed(storage.read_bytes(key), what)[0])


def write_data(storage: Storage, where: DataLayout, data: ConceptData) -> None:
    """Images and masks, then data.json (with their checksums): the marker that the training
    data is complete."""
    sums = {}
    for i, (im, m) in enumerate(zip(data.images, data.masks, strict=True)):
        for key, arr in ((where.image(i), im), (where.mask(i), m)):
            b = png_bytes(arr)
            storage.write_bytes(key, b)
            sums[_rel(key)] = sha256(b)
    notes = {"images": len(data.images), "sha256": sums, "concept": data.concept.text, **data.notes}
    write_json(storage, where.marker, notes)


def read_data(storage: Storage, where: DataLayout, concept: Concept) -> ConceptData | None:
    """A concept's stored images and masks (paired by index), or None if not complete or if
    any file does not match the checksum data.json recorded (then they are made again)."""
    if not storage.exists(where.marker):
        return None
    notes = read_json(storage, where.marker)
    n = int(notes.pop("images"))
    sums = notes.pop("sha256", None)
    notes.pop("concept", None)
    pair = read_images(storage, where, n, sums)
    if pair is None:
        return None
    return ConceptData(concept, pair[0], pair[1], notes)


def run_data(storage: Storage, layout: RunLayout, concept: Concept) -> ConceptData | None:
    """The images and masks an erase run used for a concept (through its refs.json), or None
    when the run lists none for it or they are gone (``mace-ray gc``) or damaged."""
    if not storage.exists(layout.refs):
        return None
    key = (read_json(storage, layout.refs).get("data") or {}).get(concept.slug)
    return read_data(storage, DataLayout(key), concept) if isinstance(key, str) else None


def write_result(storage: Storage, layout: RunLayout, art: ConceptArtefacts) -> None:
    """LoRA and notes, then the DONE marker with their checksums. The concept's data must
    already be stored."""
    slug = art.concept.slug
    lora = art.lora.to_bytes({"concept": art.concept.text})
    notes = json_bytes({"concept": art.concept.to_dict(), "losses": art.losses, **art.notes})
    storage.write_bytes(layout.lora(slug), lora)
    storage.write_bytes(layout.notes(slug), notes)
    done = {
        "concept": art.concept.text,
        "images": len(art.images),
        "sha256": {"lora.safetensors": sha256(lora), "notes.json": sha256(notes)},
    }
    write_json(storage, layout.done(slug), done)


def check_done(storage: Storage, layout: RunLayout, slug: str) -> str | None:
    """Why a concept's DONE marker cannot be trusted (its LoRA or notes differ from the
    checksums it recorded, or are unreadable), or None when it holds."""
    try:
        sums = read_json(storage, layout.done(slug)).get("sha256") or {}
        for name, key in (("lora.safetensors", layout.lora(slug)), ("notes.json", layout.notes(slug))):
            if name not in sums:
                return "its DONE marker records no checksums (an older version wrote it)"
            if not storage.exists(key) or storage.digest(key) != sums[name]:
                return f"{name} is missing or does not match its checksum"
    except (StorageError, AttributeError) as e:
        return f"its DONE marker is unreadable ({str(e)[:120]})"
    return None


def concept_outputs(
    storage: Storage, layout: RunLayout, slugs: list[str], threads: int = 8
) -> dict[str, str]:
    """The SHA-256 of every concept's LoRA and notes by storage key, as their DONE markers
    record them (checked when the run took them up, or written by its workers): a complete
    run records them with its final files, so that a rerun checks them too."""

    def sums(slug: str) -> dict[str, str]:
        recorded = read_json(storage, layout.done(slug)).get("sha256") or {}
        return {layout.lora(slug): recorded["lora.safetensors"], layout.notes(slug): recorded["notes.json"]}

    out: dict[str, str] = {}
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for one in pool.map(sums, slugs):
            out.update(one)
    return out


def verified_done(storage: Storage, layout: RunLayout, threads: int = 8) -> set[str]:
    """Slugs whose DONE marker exists and holds. A concept whose marker does not hold gets
    a warning line and loses the marker and LoRA, so it is trained again; its images and
    masks are kept if they still match their own checksums."""
    slugs = sorted(done_slugs(storage, layout))
    with ThreadPoolExecutor(max_workers=threads) as pool:
        problems = list(pool.map(lambda s: check_done(storage, layout, s), slugs))
    good = set()
    for slug, problem in zip(slugs, problems, strict=True):
        if problem is None:
            good.add(slug)
            continue
        log.warning("concept %s: %s; it is trained again", slug, problem)
        for key in (layout.done(slug), layout.lora(slug)):
            storage.delete_prefix(key)
    return good


def reusable(storage: Storage, key: str, check: Callable[[bytes], object]) -> bool:
    """Whether a stored artefact exists and passes ``check`` (which raises ArtefactError on a
    damaged file); a damaged one gets a warning
    line and is deleted, so that it is computed again."""
    if not storage.exists(key):
        return False
    try:
        check(storage.read_bytes(key))
        return True
    except (ArtefactError, StorageError) as e:
        log.warning("%s; it is computed again", str(e)[:300])
        storage.delete_prefix(key)
        return False


def read_lora(storage: Storage, layout: RunLayout, slug: str) -> LoraFactors:
    key = layout.lora(slug)
    return LoraFactors.from_bytes(storage.read_bytes(key), f"{storage.url}/{key}")


def read_notes(storage: Storage, layout: RunLayout, slugs: list[str], threads: int = 8) -> dict[str, dict]:
    """Every concept's notes by slug, several requests at once (a thousand concepts on S3:
    seconds, not a request's latency a thousand times over)."""
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return dict(zip(slugs, pool.map(lambda s: read_json(storage, layout.notes(s)), slugs), strict=True))


def read_images(
    storage: Storage, where: DataLayout, n: int, sums: dict[str, str] | None = None
) -> tuple[np.ndarray, np.ndarray] | None:
    """Stored images and masks of a concept, paired by index; None if any is missing, or
    differs from its checksum in ``sums`` (with a warning line)."""
    ims, ms = [], []
    for i in range(n):
        ik, mk = where.image(i), where.mask(i)
        if not (storage.exists(ik) and storage.exists(mk)):
            return None
        data = {}
        for key in (ik, mk):
            b = storage.read_bytes(key)
            if sums is not None and sums.get(_rel(key)) != sha256(b):
                log.warning("%s/%s does not match its checksum; the data is made again", storage.url, key)
                return None
            data[key] = b
        ims.append(read_png(data[ik], f"{storage.url}/{ik}"))
        ms.append(read_png(data[mk], f"{storage.url}/{mk}", mask=True))
    return np.stack(ims), np.stack(ms)
