"""Which weight files of a diffusers component the loaders read: one rule for every place
that must agree on it.

diffusers loads a component's plain safetensors weights: ``x.safetensors``, or the shards an
``x.safetensors.index.json`` lists. Every other weights file is either a variant, read only
when asked for (``x.fp16.safetensors``, ``x.fp16-00001-of-00002.safetensors``,
``x.safetensors.index.fp16.json``, ``x.ema.safetensors``), or in a format mace-ray never
reads (a pickled ``.bin``, ``.ckpt``, ...), with its shard index. The rule decides what a
model's fingerprint covers (``mace_core.fingerprint``), what is fetched of a hub model
(``mace_core.source_folder``), which component folder has weights at all
(``mace_core.model_files``) and which weight sets an erased folder rewrites
(``mace_core.erased_folder``): were they to differ, a fingerprint could depend on what
else a cache once downloaded.
"""

from __future__ import annotations

import posixpath
from fnmatch import fnmatchcase

# Weight formats the loaders never read (safetensors only): changing them changes no result.
UNREAD_WEIGHTS = (".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".h5", ".onnx", ".pb")
# The files no default load reads, as huggingface_hub patterns over a path in the repo (the
# form its downloads take them in): unread formats and their indexes, then variants.
NOT_LOADED = [
    *(f"*{s}" for s in UNREAD_WEIGHTS),
    *(f"*{s}.index.json" for s in UNREAD_WEIGHTS),
    "*.*.safetensors",
    "*.index.*.json",
]


def is_loaded(rel: str) -> bool:
    """Whether a file of a pipeline folder (path relative to it) can be read by a default
    load: anything but ``NOT_LOADED``'s weights and indexes."""
    return not any(fnmatchcase(rel, pattern) for pattern in NOT_LOADED)


def is_variant(rel: str) -> bool:
    """A variant's safetensors file or shard index (``x.fp16.safetensors``,
    ``x.safetensors.index.fp16.json``): what a load reads only when asked for."""
    name = posixpath.basename(rel)
    return fnmatchcase(name, "*.*.safetensors") or fnmatchcase(name, "*.index.*.json")
