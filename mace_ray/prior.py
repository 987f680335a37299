"""The prior statistics cache (C_p of Eq. 1-2 and 7), built once per text encoder and caption list."""

from __future__ import annotations

from typing import Any

import torch

from mace_core.models import load_text_components, pick_device
from mace_core.text_stats import (
    TextEncoder,
    model_identity,
    prior_cache_key,
    prompt_second_moment,
    read_captions,
    second_moment_bytes,
    second_moment_from_bytes,
)
from mace_ray.layout import prior_cache_key as prior_key_path
from mace_ray.storage import Storage, open_storage


def write_prior_cache(
    storage: Storage, encoder: TextEncoder, captions: list[str], key: str
) -> tuple[int, bool]:
    """Build C_p into ``cache/prior/<key>`` unless present; returns (token count, was cached)."""
    path = prior_key_path(key)
    if storage.exists(path):
        return second_moment_from_bytes(storage.read_bytes(path), f"{storage.url}/{path}").n, True
    prior = prompt_second_moment(encoder, captions)
    storage.write_bytes(path, second_moment_bytes(prior, {"captions": str(len(captions))}))
    return prior.n, False


def cache_prior(
    model: str, captions_file: str, output: str, s3_endpoint: str | None = None, device: str | None = None
) -> dict[str, Any]:
    """``mace-ray cache-prior``: the cache that every erase with this model and file reuses."""
    captions = read_captions(captions_file)
    storage = open_storage(output, s3_endpoint=s3_endpoint)
    tokenizer, text_encoder = load_text_components(model)
    dev = pick_device(device)
    encoder = TextEncoder(tokenizer, text_encoder.to(dev), dev)
    key = prior_cache_key(model_identity(text_encoder), captions)
    with torch.no_grad():
        n, cached = write_prior_cache(storage, encoder, captions, key)
    return {
        "key": f"{storage.url}/{prior_key_path(key)}",
        "captions": len(captions),
        "tokens": n,
        "cached": cached,
    }
