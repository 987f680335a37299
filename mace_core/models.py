"""Model entry points: loading a pipeline or its text side, the edited projections and the
prompt encoder of a loaded pipeline, devices.

Pipelines load through their family (``mace_core/families/``: SD 1.x, 2.x, XL, FLUX.1, SD 3.x) from a hub
id or a local diffusers folder, or the built-in ``tiny`` (``TINY_MODEL``,
``mace_core/families/model_index.py``): a seeded random SD-1.x pipeline with the real CLIP
tokenizer, built offline in about a second (``mace_core/families/sd1.py``), for demos and
tests: it runs every stage of the method, its images are noise. attn2 access lives in
``mace_core/attn2.py``, the offline CLIP tokenizer in ``mace_core/clip_text.py``.
"""

from __future__ import annotations

import torch
from torch import nn

from mace_core.errors import ModelLoadError
from mace_core.families import family_for, family_of_pipeline
from mace_core.families.base import TEXT_DTYPE, PromptEncoder
from mace_core.projections import Projections


def pick_device(device: str | None = None) -> torch.device:
    """Explicit device, else CUDA when present, else CPU. An explicit device that this
    machine does not have is a ModelLoadError naming it, before any model is loaded."""
    if not device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ModelLoadError(f"device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (dev.index or 0) >= count:
            have = f"{count} CUDA device(s)" if count else "no CUDA device"
            raise ModelLoadError(f"device {device!r}: this machine has {have}")
    elif dev.type not in ("cpu", "mps"):
        raise ModelLoadError(f"device {device!r}: only cpu and cuda devices are supported")
    return dev


# ---------------------------------------------------------------- pipelines


def load_pipeline(model: str, dtype: torch.dtype = torch.float32):  # -> a diffusers pipeline
    """Load ``tiny``, a local diffusers folder, or a hub id (offline-aware); errors name ``model``.

    The model's family is found from its model_index.json first (a pipeline class no
    family supports is refused before any weights are read). Only safetensors weights are
    read: a folder with pickled ``.bin`` weights is refused.
    """
    return family_for(model).load_pipeline(model, dtype)


def load_text_components(model: str):  # -> (CLIPTokenizer, CLIPTextModel) for SD 1.x / 2.x
    """Only the text side (tokenizer and text encoder of SD 1.x / 2.x): enough to validate
    prompts and fingerprint a model. Its family's ``prompt_encoder`` takes them."""
    return family_for(model).load_text_components(model)


def load_prompt_encoder(model: str, device: torch.device) -> PromptEncoder:
    """The text side of ``model`` alone (tokenizers and text encoders, on ``device``) as its
    family's prompt encoder: what text statistics need, without the UNet or VAE.

    The encoders are in TEXT_DTYPE whatever dtype the checkpoint was saved in, as in the
    GPU workers' pipelines (``load_pipeline``'s default), so both encode prompts alike.
    """
    family = family_for(model)
    parts = family.load_text_components(model)
    return family.prompt_encoder(
        tuple(p.to(device, TEXT_DTYPE) if isinstance(p, nn.Module) else p for p in parts), device
    )


def pipeline_projections(pipe) -> Projections:
    """The projections MACE edits in a loaded pipeline (its family's declaration): their
    ``weights()`` are what the closed forms take, ``set_weights`` puts such weights back."""
    family = family_of_pipeline(pipe)
    return family.edited_projections(family.denoiser(pipe))


def pipeline_prompt_encoder(pipe, device: torch.device) -> PromptEncoder:
    """The prompt encoder of a loaded pipeline's own text side."""
    family = family_of_pipeline(pipe)
    return family.prompt_encoder(family.text_components(pipe), device)
