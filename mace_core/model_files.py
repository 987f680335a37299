"""The files a run will load from a local model folder, checked before the run writes anything.

The driver loads only the text side (tokenizer, text encoder); the UNet, the VAE and the
scheduler are loaded by the workers, stages later. A folder that lacks one, or holds its
weights only in a format that is never read (a pickled ``.bin``: only safetensors are loaded),
is refused here, by reading the folder's listing and small JSON files, never a weight.
"""

from __future__ import annotations

from pathlib import Path

from mace_core.errors import ModelLoadError
from mace_core.families.model_index import TINY_MODEL, ModelIndex
from mace_core.fingerprint import COMPONENTS
from mace_core.weight_files import is_variant


def _plain_safetensors(folder: Path) -> bool:
    """Whether a component folder has weights the loaders read: a ``*.safetensors`` file that
    is not a variant (``x.fp16.safetensors``), or a sharded checkpoint's index."""
    names = (f.name for f in folder.iterdir())
    return any(n.endswith((".safetensors", ".safetensors.index.json")) and not is_variant(n) for n in names)


def check_model_files(model: str) -> None:
    """ModelLoadError naming ``model`` and the component unless every component the run
    loads (``model_index.json``'s, among ``fingerprint.COMPONENTS``) is a folder with its
    configuration and, for a model, safetensors weights. ``tiny`` is built, not read; hub
    snapshots and ``s3://`` folders are fetched and checked where they are loaded."""
    if model == TINY_MODEL or model[:5].lower() == "s3://":
        return
    index = ModelIndex.read(model)
    if not index.is_local:
        return
    root = Path(index.source)
    for name, entry in sorted(index.index.items()):
        if name not in COMPONENTS or not isinstance(entry, list) or None in entry:
            continue  # metadata, a component the run never loads (safety checker), or none
        folder = root / name
        if not folder.is_dir():
            raise ModelLoadError(f"model {model!r}: model_index.json names {name}, but there is no {name}/")
        if index.json(f"{name}/config.json") is not None and not _plain_safetensors(folder):
            raise ModelLoadError(
                f"model {model!r}: {name}/ has no .safetensors weights (only safetensors are loaded: a "
                "pickled .bin is never unpickled; convert it, e.g. save_pretrained(safe_serialization=True))"
            )
        if name == "scheduler" and index.json("scheduler/scheduler_config.json") is None:
            raise ModelLoadError(f"model {model!r}: scheduler/ has no scheduler_config.json")
