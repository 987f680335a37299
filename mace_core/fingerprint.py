"""Model fingerprints: a content hash of everything in a pipeline that determines a result.

A run's id, its prior cache key and the reuse of its artefacts are keyed by the model's
fingerprint, so a model folder whose UNet (or VAE, text encoder, tokenizer, scheduler or
configs) changed in place makes a new run instead of resuming, or returning, one built from
the old weights.

A fingerprint is per component (``unet``, ``vae``, ``text_encoder``, ``tokenizer``,
``scheduler``, SDXL's ``text_encoder_2`` and ``tokenizer_2``, and the pipeline's
``model_index.json``): the prior statistics depend only on the text side, so they are keyed
by the text encoders and tokenizers and shared by models that share them (SD 1.4 and 1.5 do).

Files are hashed in full (SHA-256, streamed) once: the digest is cached under the user's
cache folder, keyed by the file's path, size, mtime, ctime and inode, so a 5 GB model is read
once and every later run only stats it. Any write to a file changes its ctime, so a cached
digest never outlives the content it describes.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from mace_core.errors import ModelLoadError
from mace_core.weight_files import is_loaded

# The components a run loads (safety_checker and feature_extractor are never loaded): the
# denoiser (a UNet, or FLUX.1's / SD 3.x's MMDiT ``transformer``), the ``*_2`` pair (SDXL's
# and FLUX.1's second text encoder) and the ``*_3`` pair (SD 3.x's T5) only where a family has them.
COMPONENTS = (
    "unet",
    "transformer",
    "vae",
    "text_encoder",
    "tokenizer",
    "text_encoder_2",
    "tokenizer_2",
    "text_encoder_3",
    "tokenizer_3",
    "scheduler",
)
# What every pipeline folder has, and one of DENOISERS; the other text encoders only some families'.
REQUIRED = ("text_encoder", "tokenizer")
DENOISERS = ("unet", "transformer")
SECOND_TEXT = ("text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")
# The text side's key counts the *_2 pair only where present, so a one-encoder model's
# prior-cache key is what it was before SDXL was supported.
TEXT_SIDE = ("text_encoder", "tokenizer", *SECOND_TEXT)


class ModelChangedError(ModelLoadError):
    """The model's files changed after the run fingerprinted them."""

    def __init__(self, model: str, expected: str, now: str) -> None:
        super().__init__(
            f"model {model!r} changed after the run started (fingerprint {expected}, now {now}): "
            "a result from both versions would mix old and new weights; rerun to erase from the current model"
        )


def expect_fingerprint(model: str, expected: str, now: ModelFingerprint) -> None:
    """Raise ModelChangedError unless ``now`` is the fingerprint the run started with."""
    if now.full != expected:
        raise ModelChangedError(model, expected, now.full)


@dataclass(frozen=True)
class ModelFingerprint:
    """Per-component digests of a pipeline; ``full`` keys runs, ``text`` the prior cache."""

    components: dict[str, str]

    def of(self, names: tuple[str, ...]) -> str:
        h = hashlib.sha256()
        for name in sorted(names):
            h.update(f"{name}\0{self.components.get(name, '-')}\n".encode())
        return h.hexdigest()[:16]

    @property
    def full(self) -> str:
        return self.of(tuple(self.components))

    @property
    def text(self) -> str:
        return self.of(tuple(n for n in TEXT_SIDE if n not in SECOND_TEXT or n in self.components))

    def changed(self, other: ModelFingerprint) -> list[str]:
        """Components whose digest differs (for a message saying what changed)."""
        names = sorted(set(self.components) | set(other.components))
        return [n for n in names if self.components.get(n) != other.components.get(n)]


def combine(entries: dict[str, str]) -> ModelFingerprint:
    """Fingerprint from per-file digests keyed by the file's path in the pipeline folder."""
    per: dict[str, Any] = {}  # component -> running sha256
    for rel in sorted(entries):
        part = rel.split("/", 1)[0] if "/" in rel else "model_index"
        per.setdefault(part, hashlib.sha256()).update(f"{rel}\0{entries[rel]}\n".encode())
    return ModelFingerprint({k: h.hexdigest()[:16] for k, h in per.items()})


def is_fingerprinted(rel: str) -> bool:
    """Whether a file of a pipeline folder (path relative to it) can change a run's result.

    ``model_index.json``, and in the loaded components every file a default load can read
    (``mace_core.weight_files``: not weights in formats that are never read, not variants).
    """
    if rel == "model_index.json":
        return True
    part, _, name = rel.partition("/")
    if part not in COMPONENTS or not name or any(p.startswith(".") for p in rel.split("/")):
        return False
    return is_loaded(rel)


def digest_cache_dir() -> Path:
    """MACE_DIGEST_CACHE, else $XDG_CACHE_HOME/mace-ray/digests, else ~/.cache/mace-ray/digests."""
    if os.environ.get("MACE_DIGEST_CACHE"):
        return Path(os.environ["MACE_DIGEST_CACHE"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "mace-ray" / "digests"


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's content, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def file_digest(path: Path, cache: Path | None = None) -> str:
    """SHA-256 of a file's content, cached by its (resolved path, size, mtime, ctime, inode)."""
    real = path.resolve()  # hub snapshots are symlinks into a blob store
    st = real.stat()
    stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]
    cache = digest_cache_dir() if cache is None else cache
    entry = cache / (hashlib.sha256(str(real).encode()).hexdigest()[:32] + ".json")
    try:
        cached = json.loads(entry.read_text())
        if cached.get("stamp") == stamp:
            return str(cached["sha256"])
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    digest = file_sha256(real)
    if real.stat().st_ctime_ns != st.st_ctime_ns:
        # Written while we read it: the digest describes no single version; do not cache it.
        return digest
    try:  # the cache is an optimisation: an unwritable cache folder only costs re-reading
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache, prefix=".", suffix=".tmp")
        with os.fdopen(fd, "w") as out:
            json.dump({"path": str(real), "stamp": stamp, "sha256": digest}, out)
        os.replace(tmp, entry)
    except OSError:
        pass
    return digest


def folder_fingerprint(
    folder: str | Path, cache: Path | None = None, files: list[str] | None = None
) -> ModelFingerprint:
    """Fingerprint of a local diffusers pipeline folder: every file ``is_fingerprinted``
    (``files``: of these, relative to the folder; default every file in it)."""
    root = Path(folder)
    if not (root / "model_index.json").is_file():
        raise ModelLoadError(f"model {str(folder)!r}: not a diffusers pipeline folder (no model_index.json)")
    rels = files if files is not None else [p.relative_to(root).as_posix() for p in root.rglob("*")]
    entries: dict[str, str] = {}
    for rel in sorted(r for r in rels if is_fingerprinted(r)):
        p = root / rel
        if p.is_file():
            try:
                entries[rel] = file_digest(p, cache)
            except OSError as e:
                raise ModelLoadError(f"model {str(folder)!r}: cannot read {rel}: {e.strerror}") from None
    return pipeline_fingerprint_of(str(folder), entries)


def pipeline_fingerprint_of(model: str, entries: dict[str, str]) -> ModelFingerprint:
    """The fingerprint of a pipeline's files (``{path in the folder: SHA-256}``, the ones
    ``is_fingerprinted``); ModelLoadError naming ``model`` when a required component is missing."""
    if not any(rel.startswith(d + "/") for d in DENOISERS for rel in entries):
        raise ModelLoadError(f"model {model!r}: no unet/ or transformer/ in the pipeline folder")
    for part in REQUIRED:
        if not any(rel.startswith(part + "/") for rel in entries):
            raise ModelLoadError(f"model {model!r}: no {part}/ in the pipeline folder")
    return combine(entries)


def pipeline_fingerprint(pipe) -> ModelFingerprint:  # pipe: StableDiffusionPipeline
    """Fingerprint of a pipeline in memory: every tensor and config of its components."""
    out: dict[str, str] = {}
    for name in COMPONENTS:
        comp = getattr(pipe, name, None)
        if comp is None:
            continue
        h = hashlib.sha256()
        config = getattr(comp, "config", None)
        if config is not None:
            items = config.to_dict() if hasattr(config, "to_dict") else dict(config)
            # Keys with a leading underscore are bookkeeping (library version, which values
            # were defaulted, in set order that changes from process to process).
            public = {k: v for k, v in items.items() if not k.startswith("_")}
            h.update(json.dumps(public, sort_keys=True, default=str).encode())
        if isinstance(comp, torch.nn.Module):
            for key, t in sorted(comp.state_dict().items()):
                h.update(f"{key}{tuple(t.shape)}{t.dtype}".encode())
                h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        if name.startswith("tokenizer"):
            h.update(json.dumps(comp.get_vocab(), sort_keys=True).encode())
        out[name] = h.hexdigest()[:16]
    return ModelFingerprint(out)


@lru_cache(maxsize=1)
def tiny_fingerprint() -> ModelFingerprint:
    """The built-in tiny pipeline's fingerprint (built and hashed once per process)."""
    from mace_core.families.sd1 import build_tiny_pipeline

    return pipeline_fingerprint(build_tiny_pipeline())
