"""What MACE needs from a model family, and what every diffusers text-to-image family shares.

A family (SD 1.x, SD 2.x, ...) is one module of ``mace_core.families`` that defines
``FAMILY``, an instance of a ``ModelFamily`` subclass. The method touches a model only
through it:

- recognising a model from its ``model_index.json`` (``ModelIndex``) or a loaded pipeline;
- loading the pipeline, or only its text side (CPU workers computing text statistics);
- a ``PromptEncoder``: token ids, the UNet's cross-attention context of prompts (the
  token states every statistic and closed form is built from) and any extra UNet
  conditioning, and the UNet call that uses them;
- the attn2 to_k / to_v projections MACE edits;
- generating images (training images and evaluation images alike);
- its prediction type, which generation keeps. MACE's LoRA loss (Eq. 3) is on attention
  maps only, so no family needs a denoising target.

Alignment (``mace_core/alignment.py``) and the Eq. 3 token mask (``mace_core/train.py``)
go by position, not by token id: positions ``len(ids) ..`` are padding whatever token a
tokenizer pads with. A family states its pad token so that this is checked, not assumed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from mace_core.attn2 import attn2_projections
from mace_core.errors import ConceptError, GenerationError, ModelLoadError, quoted
from mace_core.families.model_index import TINY_MODEL, ModelIndex, resolve_source

# Per-prompt UNet conditioning, every tensor batch-first (row i belongs to prompt i).
# "context" is the cross-attention context (encoder_hidden_states); a family may add more.
Conditioning = dict[str, torch.Tensor]


def stack_rows(conds: Sequence[Conditioning], rows: Sequence[int]) -> Conditioning:
    """One batch from row ``rows[j]`` of ``conds[j]`` for every j (one sample per job)."""
    return {key: torch.stack([c[key][r] for c, r in zip(conds, rows, strict=True)]) for key in conds[0]}


def conditioning_to(cond: Conditioning, *args: Any) -> Conditioning:
    """Every tensor moved or cast as ``Tensor.to(*args)``."""
    return {key: v.to(*args) for key, v in cond.items()}


class PromptEncoder(ABC):
    """A family's text side: token ids, the UNet's context of prompts and the UNet call.

    ``encode`` gives the cross-attention context, (N, max_length, dim) float32 on the CPU:
    the token states that the attn2 to_k / to_v projections see, so every statistic of
    ``mace_core/text_stats.py`` is built from it. ``ids`` are the unpadded token ids
    (start and end tokens included) whose positions index that context.
    """

    max_length: int
    batch_size: int
    device: torch.device

    @property
    @abstractmethod
    def dim(self) -> int:
        """Width of a context token: the input width of the attn2 to_k / to_v projections."""

    @abstractmethod
    def ids(self, prompt: str) -> list[int]:
        """Unpadded token ids with start/end tokens."""

    @abstractmethod
    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """The cross-attention context, (len(prompts), max_length, dim), float32 on the CPU."""

    def check_length(self, prompt: str, what: str) -> None:
        n = len(self.ids(prompt))
        if n > self.max_length:
            raise ConceptError(
                f"{what}: prompt {quoted(prompt)} is {n} tokens, the text encoder takes {self.max_length}"
            )

    def conditioning(self, prompts: Sequence[str]) -> Conditioning:
        """Everything the UNet is conditioned on per prompt (float32, CPU): the context only,
        unless a family needs more (SDXL's pooled text embeddings)."""
        return {"context": self.encode(prompts)}

    def unet_forward(self, unet: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> Any:
        """The UNet on noised latents ``x`` at timesteps ``t`` with a batch of ``conditioning``."""
        return unet(x, t, encoder_hidden_states=cond["context"])


def initial_noise(
    generators: list[torch.Generator], shape: tuple[int, int, int], dtype: torch.dtype
) -> torch.Tensor:
    """One (C, h, w) standard-normal latent per generator, drawn in fp32 on the CPU, then cast.

    The same draws diffusers makes for a list of CPU generators in fp32, so fp32 images are
    unchanged; drawing in fp32 first makes an fp16 pipeline start from the same noise.
    """
    return torch.cat([torch.randn((1, *shape), generator=g, dtype=torch.float32) for g in generators]).to(
        dtype
    )


class ModelFamily(ABC):
    """One kind of diffusers text-to-image pipeline: how MACE loads, conditions and samples it.

    The shared implementation here is for pipelines that take ``prompt=`` and latents
    and whose UNet is a UNet2DConditionModel; a family overrides what differs.
    """

    name: ClassVar[str]  # short name, e.g. "sd1"
    pipeline_class: ClassVar[str]  # the diffusers class of its model_index.json ``_class_name``
    description: ClassVar[str]  # how it is recognised, for error messages
    pad_token: ClassVar[str]  # what its tokenizer pads prompts with after end-of-text
    pad_token_id: ClassVar[int]
    # Extra keyword arguments of the pipeline's from_pretrained.
    load_kwargs: ClassVar[dict[str, Any]] = {}

    # ------------------------------------------------------------ recognition

    def recognises(self, index: ModelIndex) -> bool:
        """Whether the model of ``index`` is of this family (by its class; override to look further)."""
        return index.class_name == self.pipeline_class

    def recognises_pipeline(self, pipe: Any) -> bool:
        """Whether a loaded pipeline is of this family."""
        return type(pipe).__name__ == self.pipeline_class

    # ------------------------------------------------------------ loading

    @abstractmethod
    def build_tiny_pipeline(self, seed: int = 0) -> Any:
        """A seeded random pipeline of this family's shape (tiny widths), built offline."""

    def load_pipeline(self, model: str, dtype: torch.dtype = torch.float32) -> Any:
        """``tiny`` (this family's), a local diffusers folder or a hub id; errors name ``model``.

        Only safetensors weights are read: a folder with pickled ``.bin`` weights is refused.
        """
        if model == TINY_MODEL:
            pipe = self.build_tiny_pipeline()
            return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)
        import diffusers

        source, is_local = resolve_source(model)
        try:
            pipe = getattr(diffusers, self.pipeline_class).from_pretrained(
                source,
                dtype=dtype,
                local_files_only=is_local,
                use_safetensors=True,  # never unpickle a .bin checkpoint
                **self.load_kwargs,
            )
        except Exception as e:  # diffusers raises many kinds (OSError, ValueError, HF errors)
            raise load_error(model, e) from None
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @abstractmethod
    def load_text_components(self, model: str) -> tuple[Any, ...]:
        """Only the text side (tokenizers, text encoders), as ``prompt_encoder`` takes them."""

    @abstractmethod
    def text_components(self, pipe: Any) -> tuple[Any, ...]:
        """The same components of a loaded pipeline."""

    @abstractmethod
    def prompt_encoder(
        self, components: tuple[Any, ...], device: torch.device, batch_size: int = 64
    ) -> PromptEncoder:
        """The PromptEncoder of text components (from ``load_text_components`` or ``text_components``)."""

    # ------------------------------------------------------------ UNet

    def attn2_projections(self, unet: nn.Module) -> dict[str, nn.Linear]:
        """The cross-attention to_k / to_v layers MACE edits, keyed by state-dict name, sorted."""
        return attn2_projections(unet)

    # ------------------------------------------------------------ generation

    def prediction_type(self, pipe: Any) -> str:
        """What the UNet predicts (epsilon, v_prediction, ...), from the pipeline's scheduler."""
        return str(pipe.scheduler.config.get("prediction_type", "epsilon"))

    def use_dpm_solver(self, pipe: Any) -> None:
        """Sample with DPM-Solver++ from now on, keeping the model's noise schedule and
        prediction type (a v-prediction model sampled as epsilon gives garbage)."""
        from diffusers import DPMSolverMultistepScheduler

        if not isinstance(pipe.scheduler, DPMSolverMultistepScheduler):
            pipe.scheduler = DPMSolverMultistepScheduler.from_config(
                pipe.scheduler.config, prediction_type=self.prediction_type(pipe)
            )

    @torch.no_grad()
    def generate(
        self,
        pipe: Any,
        prompts: Sequence[str],
        seeds: Sequence[int],
        height: int,
        width: int,
        steps: int,
        guidance: float,
        on_step: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        """One pipeline call: image i of ``prompts[i]`` from its own ``seeds[i]``, uint8 (N, H, W, 3).

        Every image has its own CPU generator and its initial noise drawn in fp32 on the
        CPU (``initial_noise``), so an image does not depend on the batch it is in.
        DPM-Solver with classifier-free guidance; ``on_step(i)`` after denoising step i.
        """
        self.use_dpm_solver(pipe)
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        scale = int(pipe.vae_scale_factor)
        shape = (int(pipe.unet.config.in_channels), height // scale, width // scale)

        def callback(pipe: Any, i: int, t: Any, kwargs: dict) -> dict:
            if on_step is not None:
                on_step(i)
            return kwargs

        images = pipe(
            prompt=list(prompts),
            num_inference_steps=steps,
            guidance_scale=guidance,
            latents=initial_noise(gens, shape, pipe.unet.dtype),
            generator=gens,  # stochastic schedulers draw their step noise from them
            height=height,
            width=width,
            output_type="np",
            callback_on_step_end=callback if on_step is not None else None,
        ).images
        if not np.isfinite(images).all():
            dtype = pipe.unet.dtype
            raise GenerationError(
                f"non-finite pixels generating {quoted(prompts[0])} with a {dtype} pipeline"
                + (" (fp16 overflow? use float32)" if dtype == torch.float16 else "")
            )
        return (np.clip(images, 0.0, 1.0) * 255).round().astype(np.uint8)


def load_error(model: str, e: Exception) -> ModelLoadError:
    """A loader's exception as one line naming ``model``."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return ModelLoadError(f"model {model!r} cannot be loaded: {first[:300]}")
