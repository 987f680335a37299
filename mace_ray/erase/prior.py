"""The prior statistics cache (C_p of Eq. 1-2 and 7), built once per text encoder and caption list."""

from __future__ import annotations

from typing import Any

import torch

from mace_core.families.base import PromptEncoder
from mace_core.models import load_prompt_encoder, pick_device
from mace_core.text_stats import (
    prior_cache_key,
    prompt_second_moment,
    read_captions,
    second_moment_bytes,
    second_moment_from_bytes,
)
from mace_ray.erase.artefacts import reusable
from mace_ray.erase.layout import prior_cache_path
from mace_ray.erase.locate import run_root
from mace_ray.storage.base import Storage
from mace_ray.storage.model_cache import TEXT_COMPONENTS
from mace_ray.storage.open_store import open_storage
from mace_ray.storage.resolve import Sources


def write_prior_cache(
    storage: Storage, encoder: PromptEncoder, captions: list[str], key: str
) -> tuple[int, bool]:
    """Build C_p into ``cache/prior/<key>`` unless present; returns (token count, was cached)."""
    path = prior_cache_path(key)
    what = f"{storage.url}/{path}"
    if reusable(storage, path, lambda b: second_moment_from_bytes(b, what)):
        return second_moment_from_bytes(storage.read_bytes(path), what).n, True
    prior = prompt_second_moment(encoder, captions)
    storage.write_bytes(path, second_moment_bytes(prior, {"captions": str(len(captions))}))
    return prior.n, False


def cache_prior(
    model: str, captions_file: str, output: str, s3_endpoint: str | None = None, device: str | None = None
) -> dict[str, Any]:
    """``mace-ray cache-prior``: the cache that every erase with this model and file reuses.
    ``model``: as erase's --model (an s3:// folder is read through the output's client when
    it lies under the output, ``mace_ray.storage.resolve``)."""
    captions = read_captions(captions_file)
    storage = open_storage(run_root(output), s3_endpoint=s3_endpoint)
    sources = Sources(s3_endpoint, output=storage)
    fingerprint = sources.fingerprint(model)
    encoder = load_prompt_encoder(sources.pipeline(model, TEXT_COMPONENTS), pick_device(device))
    key = prior_cache_key(fingerprint.text, captions)
    with torch.no_grad():
        n, cached = write_prior_cache(storage, encoder, captions, key)
    return {
        "key": f"{storage.url}/{prior_cache_path(key)}",
        "captions": len(captions),
        "tokens": n,
        "cached": cached,
    }
