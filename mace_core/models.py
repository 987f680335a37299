"""Loading Stable Diffusion pipelines, the built-in tiny random pipeline, attn2 access.

SD 1.x / 2.x pipelines load from a hub id or a local diffusers folder. ``tiny`` is a
seeded random pipeline with the real CLIP tokenizer, built offline in about a second,
for demos and tests: it runs every stage of the method, its images are noise.
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from mace_core.errors import ModelLoadError
from mace_core.pretrained import looks_like_path

TINY_MODEL = "tiny"
# The tiny CLIP text tower (real 49408-token vocabulary, 77 positions): the tiny pipeline's
# text encoder and the tiny evaluation CLIP share it.
TINY_CLIP_TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    vocab_size=49408,
    max_position_embeddings=77,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)
DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"


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


def attn2_projections(unet: nn.Module) -> dict[str, nn.Linear]:
    """The to_k / to_v linear layers of every cross-attention block, keyed by weight name.

    Keys are state-dict names (``...attn2.to_k.weight``), sorted, so they index the
    compact erasure file and the statistics alike.
    """
    out: dict[str, nn.Linear] = {}
    for name, module in unet.named_modules():
        parts = name.split(".")
        if len(parts) >= 2 and parts[-2] == "attn2" and parts[-1] in ("to_k", "to_v"):
            if not isinstance(module, nn.Linear):
                raise ModelLoadError(f"{name} is a {type(module).__name__}, expected a plain nn.Linear")
            out[f"{name}.weight"] = module
    if not out:
        raise ModelLoadError("the UNet has no cross-attention (attn2) to_k/to_v layers")
    return dict(sorted(out.items()))


def get_attn2_weights(unet: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the attn2 to_k/to_v weights (float32, CPU)."""
    return {k: m.weight.detach().float().cpu().clone() for k, m in attn2_projections(unet).items()}


def set_attn2_weights(unet: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Replace attn2 to_k/to_v weights in place; keys and shapes must match exactly."""
    projs = attn2_projections(unet)
    missing, extra = set(projs) - set(weights), set(weights) - set(projs)
    if missing or extra:
        raise ModelLoadError(
            f"attn2 weights do not match the model: {len(missing)} missing, {len(extra)} unexpected"
            + (f" (e.g. {sorted(missing or extra)[0]})" if missing or extra else "")
        )
    with torch.no_grad():
        for k, m in projs.items():
            if tuple(weights[k].shape) != tuple(m.weight.shape):
                raise ModelLoadError(f"{k}: shape {tuple(weights[k].shape)} != model {tuple(m.weight.shape)}")
            m.weight.copy_(weights[k].to(m.weight.device, m.weight.dtype))


@contextmanager
def attn2_weights(unet: nn.Module, weights: dict[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily run the UNet with other attn2 weights (original vs refined)."""
    saved = get_attn2_weights(unet)
    set_attn2_weights(unet, weights)
    try:
        yield
    finally:
        set_attn2_weights(unet, saved)


# ---------------------------------------------------------------- tokenizer


def _clip_vocab_path() -> Path:
    """CLIP's BPE vocabulary, shipped as package data (mace_core/data/clip/SOURCE.md)."""
    from importlib import resources

    path = Path(str(resources.files("mace_core").joinpath("data/clip/bpe_simple_vocab_16e6.txt.gz")))
    if not path.is_file():
        raise ModelLoadError(f"CLIP vocabulary not found at {path} (a broken install of mace-ray)")
    return path


def _bytes_to_unicode() -> dict[int, str]:
    # The reversible byte -> printable-character map of GPT-2/CLIP byte-level BPE.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def write_clip_tokenizer_files(folder: Path) -> None:
    """Write vocab.json / merges.txt of the real CLIP tokenizer (49408 tokens)."""
    with gzip.open(_clip_vocab_path(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    base = list(_bytes_to_unicode().values())
    vocab = base + [v + "</w>" for v in base] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({v: i for i, v in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8"
    )


@lru_cache(maxsize=1)
def clip_tokenizer():  # -> CLIPTokenizer
    """The real CLIP tokenizer (SD 1.x), built offline from CLIP's vocabulary."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_clip_tokenizer_files(Path(tmp))
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=77, pad_token="<|endoftext|>")


# ---------------------------------------------------------------- pipelines


def build_tiny_pipeline(seed: int = 0):  # -> StableDiffusionPipeline
    """A seeded random SD-1.x-shaped pipeline (tiny widths), identical on every machine."""
    from diffusers import (
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    # fork_rng keeps the caller's global RNG untouched (no hidden side effects).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=1,
            sample_size=32,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=4,
            norm_num_groups=8,
        )
        vae = AutoencoderKL(
            block_out_channels=(32,),
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",),
            up_block_types=("UpDecoderBlock2D",),
            latent_channels=4,
            norm_num_groups=8,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_CLIP_TEXT))
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder.eval(),
        tokenizer=clip_tokenizer(),
        unet=unet.eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def resolve_source(model: str) -> tuple[str, bool]:
    """(path or hub id, is_local). Local folders are checked here so errors name them."""
    if not looks_like_path(model):
        return model, False
    local = Path(model).expanduser()
    if not local.is_dir():
        raise ModelLoadError(f"model {model!r}: no such folder")
    if not (local / "model_index.json").is_file():
        raise ModelLoadError(f"model {model!r}: not a diffusers pipeline folder (no model_index.json)")
    if not os.access(local / "model_index.json", os.R_OK):
        raise ModelLoadError(f"model {model!r}: model_index.json is not readable")
    return str(local), True


def _load_error(model: str, e: Exception) -> ModelLoadError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return ModelLoadError(f"model {model!r} cannot be loaded: {first[:300]}")


def load_pipeline(model: str, dtype: torch.dtype = torch.float32):  # -> StableDiffusionPipeline
    """Load ``tiny``, a local diffusers folder, or a hub id (offline-aware); errors name ``model``.

    Only safetensors weights are read: a folder with pickled ``.bin`` weights is refused.
    """
    if model == TINY_MODEL:
        pipe = build_tiny_pipeline()
        return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)
    from diffusers import StableDiffusionPipeline

    source, is_local = resolve_source(model)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            source,
            dtype=dtype,
            safety_checker=None,
            requires_safety_checker=False,
            local_files_only=is_local,
            use_safetensors=True,  # never unpickle a .bin checkpoint
        )
    except Exception as e:  # diffusers raises many kinds (OSError, ValueError, HF errors)
        raise _load_error(model, e) from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_text_components(model: str):  # -> (CLIPTokenizer, CLIPTextModel)
    """Only the tokenizer and text encoder: enough to validate prompts and fingerprint a model."""
    if model == TINY_MODEL:
        pipe = build_tiny_pipeline()
        return pipe.tokenizer, pipe.text_encoder
    from transformers import CLIPTextModel, CLIPTokenizer

    source, is_local = resolve_source(model)
    try:
        tok = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", local_files_only=is_local)
        te = CLIPTextModel.from_pretrained(
            source, subfolder="text_encoder", local_files_only=is_local, use_safetensors=True
        )
    except Exception as e:
        raise _load_error(model, e) from None
    return tok, te.eval()
