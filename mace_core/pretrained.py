"""Loading transformers models for the masking stage from a hub id or a local folder.

One rule for every detector and segmenter: a spec that looks like a path must be an
existing folder (loaded with ``local_files_only``); anything else is a hub id. Every
failure becomes one ``ModelLoadError`` line that names the spec, so a typo or a hub id
that is not in the offline cache is reported as such, not as a transformers traceback.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from mace_core.errors import ModelLoadError

T = TypeVar("T")

# The spec that selects a built-in tiny random model instead of loading one.
TINY = "tiny"


def looks_like_path(spec: str) -> bool:
    """Hub ids are ``name`` or ``owner/name``; anything else (or anything on disk) is a path."""
    return Path(spec).expanduser().exists() or spec.startswith((".", "/", "~")) or spec.count("/") > 1


def resolve_pretrained(spec: str, what: str) -> tuple[str, bool]:
    """(source for ``from_pretrained``, local_files_only); a local spec must be a folder."""
    if not looks_like_path(spec):
        return spec, False
    if "://" in spec:  # never through Path (s3://b/k would become s3:/b/k)
        raise ModelLoadError(
            f"{what} {spec!r}: a URL; give a local folder (mace-ray fetches s3:// ones first)"
        )
    local = Path(spec).expanduser()
    if not local.exists():
        raise ModelLoadError(f"{what} {spec!r}: no such folder")
    if not local.is_dir():
        raise ModelLoadError(f"{what} {spec!r}: expected a transformers model folder, got a file")
    if not (local / "config.json").is_file():
        raise ModelLoadError(f"{what} {spec!r}: not a transformers model folder (no config.json)")
    return str(local), True


def load_pretrained(load: Callable[[str, bool], T], spec: str, what: str) -> T:
    """Run ``load(source, local_files_only)``; any failure becomes a ModelLoadError naming ``spec``."""
    source, local_only = resolve_pretrained(spec, what)
    try:
        return load(source, local_only)
    except ModelLoadError:
        raise
    except Exception as e:  # transformers raises OSError, ValueError, HF hub errors, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        kind = "folder" if local_only else "hub id"
        raise ModelLoadError(f"{what} {kind} {spec!r} cannot be loaded: {first[:300]}") from None


def load_model_and_processor(
    spec: str, what: str, model_type: str, label: str, model_cls: Any, processor_cls: Any
) -> tuple[Any, Any]:
    """A transformers model whose config says ``model_type``, and its processor, from ``spec``.

    A model of another type is a ModelLoadError naming ``spec`` and ``label`` (what it should be).
    """

    def load(source: str, local_only: bool) -> tuple[Any, Any]:
        from transformers import AutoConfig

        kind = AutoConfig.from_pretrained(source, local_files_only=local_only).model_type
        if kind != model_type:
            raise ModelLoadError(f"{what} {spec!r} is a {kind!r} model, not {label}")
        # safetensors only: a pickled pytorch_model.bin is never loaded (no code runs on load)
        model = model_cls.from_pretrained(source, local_files_only=local_only, use_safetensors=True)
        return model, processor_cls.from_pretrained(source, local_files_only=local_only)

    return load_pretrained(load, spec, what)
