"""The erased pipeline on disk: the source folder with only the edited tensors replaced.

What a run (and ``mace-ray apply``) writes is a diffusers folder in which

- every file outside the edited component (the family's ``edited_component``: ``unet`` for
  SD 1.x / 2.x / XL) is the source's, copied byte for byte: ``model_index.json``, scheduler,
  safety checker, feature extractor, tokenizers, text encoders, VAE;
- in the edited component every file but its weights is copied too (config, a shard
  index), and each safetensors weight set (one file, or the shards an index lists) that
  holds the weights the erasure was computed on is rewritten with the edited tensors'
  bytes replaced, in the dtype each is stored in: header, metadata and every other tensor
  stay bit-identical (``mace_core.safetensors_file``). That is the set the loaders read
  and any variant of it in another precision (``*.fp16.safetensors``);
- a weight file of the edited component that cannot carry the edit is left out, and the
  result says which and why: weights in formats that are never read (``.bin``, ``.ckpt``,
  ``.msgpack``, ...) and safetensors sets holding other weights (an EMA copy). Copied, they
  would give whoever loads them (``variant="fp16"``, ``use_safetensors=False``) the
  un-erased model.

Nothing is re-serialised from a loaded pipeline, so nothing a generation changed in one
(a scheduler swapped for DPM-Solver, a dtype) can reach the output.
"""

from __future__ import annotations

import json
import posixpath
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mace_core.errors import ArtefactError, ModelLoadError
from mace_core.safetensors_file import SafetensorsHeader, write_patched
from mace_core.source_folder import SourceFolder
from mace_core.weight_files import UNREAD_WEIGHTS, is_variant


@dataclass
class WeightSet:
    """Weights of the edited component stored together: one safetensors file, or the
    shards listed by one index file (``name``: the file or the index, relative)."""

    name: str
    files: list[str]

    @property
    def variant(self) -> bool:
        """``x.fp16.safetensors`` or ``x.safetensors.index.fp16.json``: not what loaders read by default."""
        return is_variant(self.name)


@dataclass
class ErasedFolder:
    """What writing an erased folder did, by file (paths relative to the folder)."""

    copied: list[str] = field(default_factory=list)
    rewritten: list[str] = field(default_factory=list)
    left_out: dict[str, str] = field(default_factory=dict)  # file -> why

    def notes(self) -> list[str]:
        """One line per file left out (for the log and the run's report)."""
        return [f"{rel} left out: {why}" for rel, why in sorted(self.left_out.items())]

    def to_dict(self) -> dict[str, object]:
        return {"copied": len(self.copied), "rewritten": self.rewritten, "left_out": self.left_out}


def _index_shards(source: Path, rel: str) -> list[str] | None:
    """The files a shard index (``*.index.json``, ``*.index.<variant>.json``) lists, relative
    to the folder; None for a JSON file that is not a shard index."""
    if ".index." not in posixpath.basename(rel):
        return None
    try:
        data = json.loads((source / rel).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        return None
    return sorted({posixpath.join(posixpath.dirname(rel), str(f)) for f in weight_map.values()})


def _plan(source: Path, files: list[str], component: str, out: ErasedFolder) -> list[WeightSet]:
    """The component's safetensors weight sets; every other file of it goes to ``copied``
    or, for weights that are never read, to ``left_out``."""
    mine = [f for f in files if f.startswith(component + "/")]
    present = set(mine)
    sets: list[WeightSet] = []
    sharded: set[str] = set()
    for rel in mine:
        shards = _index_shards(source, rel) if rel.endswith(".json") else None
        if shards is None:
            continue
        if not all(s.endswith(".safetensors") for s in shards):
            out.left_out[rel] = "the index of weights that are never read (not safetensors)"
        elif not set(shards) <= present:
            out.left_out[rel] = (
                f"it lists shards the folder does not have ({sorted(set(shards) - present)[0]})"
            )
        else:
            sets.append(WeightSet(rel, shards))
        sharded.update(shards)
    for rel in mine:
        if rel in out.left_out or any(s.name == rel for s in sets):
            continue
        if rel.endswith(UNREAD_WEIGHTS):
            out.left_out[rel] = (
                f"{component} weights in a format mace-ray never reads; a copy would hold the"
                " un-erased weights"
            )
        elif rel.endswith(".safetensors"):
            if rel not in sharded:
                sets.append(WeightSet(rel, [rel]))
        else:
            out.copied.append(rel)
    # Sets of shards whose index was left out: the shards go too.
    for rel in sorted(sharded - {f for s in sets for f in s.files}):
        if rel in present and rel.endswith(".safetensors"):
            out.left_out[rel] = "a shard of a left-out index"
    return sets


def _same_weights(reference: dict[str, torch.Tensor], headers: list[SafetensorsHeader]) -> str | None:
    """None if the edited tensors of a set are the reference's (in the lower of the two
    precisions: an fp16 copy of fp32 weights is the same model); else the first that is not."""
    entries = {name: h for h in headers for name in h.entries}
    for name, ref in reference.items():
        if name not in entries:
            return f"it has no tensor {name!r}, so it cannot carry the edit"
        got = entries[name].tensor(name)
        low = got.dtype if got.element_size() <= ref.element_size() else ref.dtype
        if got.shape != ref.shape or not torch.equal(got.to(low), ref.to(low)):
            return (
                f"its {name!r} differs from the weights the erasure was computed on (an EMA or other"
                " copy), so it cannot carry the edit"
            )
    return None


def write_erased_folder(
    source: SourceFolder, dest: Path, component: str, edited: dict[str, torch.Tensor], what: str = "erasure"
) -> ErasedFolder:
    """Write into ``dest`` (new or empty) the source pipeline with ``component``'s tensors
    named in ``edited`` (state-dict names inside the component) replaced; see the module.

    ArtefactError (naming ``what``) when the component's weights lack an edited tensor or
    hold it in another shape; ModelLoadError when the source has no such component or no
    safetensors weights of it that the loaders read.
    """
    out = ErasedFolder()
    sets = _plan(source.path, source.files, component, out)
    main = [s for s in sets if not s.variant]
    if not main:
        raise ModelLoadError(
            f"model folder {str(source.path)!r}: {component}/ has no safetensors weights that are loaded"
            " (only variants, or none)"
        )
    # The set the loaders read (a single file before a sharded copy, as diffusers looks for them).
    reference_set = sorted(main, key=lambda s: (len(s.files) > 1, s.name))[0]
    where: dict[str, SafetensorsHeader] = {}
    for f in reference_set.files:
        h = SafetensorsHeader.read(source.path / f, str(source.path / f))
        where.update(dict.fromkeys(h.entries, h))
    for name in edited:
        if name not in where:
            raise ArtefactError(
                f"{what}: tensor {name!r} is not in {component}/ of {str(source.path)!r}"
                " (an erasure of another model?)"
            )
    reference = {name: where[name].tensor(name) for name in edited}

    dest.mkdir(parents=True, exist_ok=True)
    for s in sets:
        try:
            mine = [SafetensorsHeader.read(source.path / f, f) for f in s.files]
        except ArtefactError as e:
            if s is reference_set:
                raise
            mine, why = [], f"{e}, so it cannot carry the edit"
        else:
            why = None if s is reference_set else _same_weights(reference, mine)
        if why is not None:
            out.left_out.update(dict.fromkeys(s.files, why))
            if s.name not in s.files:
                out.left_out[s.name] = "the index of a left-out set of shards"
            continue
        for h, rel in zip(mine, s.files, strict=True):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            write_patched(h, dest / rel, {k: v for k, v in edited.items() if k in h.entries})
            out.rewritten.append(rel)
        if s.name not in s.files:
            out.copied.append(s.name)  # the index: offsets and sizes are unchanged
    out.copied += [f for f in source.files if not f.startswith(component + "/")]
    for rel in out.copied:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source.path / rel, dest / rel)
    out.copied.sort()
    out.rewritten.sort()
    return out
