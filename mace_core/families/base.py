"""What MACE needs from a model family, and what every diffusers text-to-image family shares.

A family (SD 1.x, SD 2.x, ...) is one module of ``mace_core.families`` that defines
``FAMILY``, an instance of a ``ModelFamily`` subclass. The method touches a model only
through it:

- recognising a model from its ``model_index.json`` (``ModelIndex``) or a loaded pipeline;
- loading the pipeline, or only its text side (CPU workers computing text statistics);
- a ``PromptEncoder``: token ids, the UNet's cross-attention context of prompts (the
  token states every statistic and closed form is built from) and any extra UNet
  conditioning, and the UNet call that uses them;
- the projections MACE edits (``edited_projections``: the attn2 to_k / to_v of a UNet, an
  MMDiT's context_embedder and pooled text projection; ``mace_core.projections``), in the
  component ``edited_component``, and how training noises latents (``training_schedule``);
- generating images (training images and evaluation images alike);
- its prediction type, which generation keeps. MACE's LoRA loss (Eq. 3) is on attention
  maps only, so no family needs a denoising target.

Alignment (``mace_core/alignment.py``) and the Eq. 3 token mask (``mace_core/train.py``)
go by position, not by token id: positions ``len(ids) ..`` are padding whatever token a
tokenizer pads with. A family states its pad token so that this is checked, not assumed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from mace_core.alignment import Alignment, align_tokens
from mace_core.attention import cross_attention_probes
from mace_core.attn2 import attn2_projections
from mace_core.errors import ConceptError, GenerationError, ModelLoadError, quoted
from mace_core.families.model_index import TINY_MODEL, ModelIndex, resolve_source
from mace_core.lora import LoraBank
from mace_core.projections import Projections
from mace_core.token_positions import find_subsequences

# The precision every prompt is encoded in, on CPU text workers and GPU workers alike,
# whatever dtype a checkpoint was saved in: the text statistics and the prior cache key
# depend on it (an fp16-saved text encoder is loaded in it, not in fp16).
TEXT_DTYPE = torch.float32
# (tokenizer class, text encoder class) of each text encoder of a pipeline (transformers names).
TextSide = tuple[tuple[str, str], ...]

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
    """A family's text side: token ids, the denoiser's context of prompts and the denoiser call.

    ``encode`` gives the token states the edited projections see, (N, rows, dim) float32 on
    the CPU: for SD the cross-attention context (rows = max_length) that every attn2 to_k /
    to_v projects; for an MMDiT its context rows and one pooled row (``families/mmdit.py``).
    Every statistic of ``mace_core/text_stats.py`` is built from it. ``ids`` are the unpadded
    token ids (start and end tokens included) whose positions index that context.
    """

    max_length: int
    batch_size: int
    device: torch.device
    # Columns of the pooled block at the end of ``encode``'s rows (an MMDiT's pooled row,
    # ``families/mmdit.py``; ``mace_core.text_stats`` counts its rows): none for SD.
    pooled_width: int = 0
    # The pipeline component the denoiser is (its family's ``edited_component``).
    component: ClassVar[str] = "unet"
    # Whether ``encode`` and ``conditioning`` record gradients: no (no-grad batches), but
    # inside ``differentiable()``, where the audit's embedding attacks differentiate through
    # them. A family encodes under ``torch.set_grad_enabled(self.grad)``.
    grad: bool = False

    @property
    @abstractmethod
    def dim(self) -> int:
        """Width of a token state: the width of the space the edited projections read."""

    @abstractmethod
    def ids(self, prompt: str) -> list[int]:
        """Unpadded token ids with start/end tokens."""

    @abstractmethod
    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """The edited projections' token states, (len(prompts), rows, dim), float32 on the CPU
        (SD: the cross-attention context, rows = max_length)."""

    def check_length(self, prompt: str, what: str) -> None:
        n = len(self.ids(prompt))
        if n > self.max_length:
            raise ConceptError(
                f"{what}: prompt {quoted(prompt)} is {n} tokens, the text encoder takes {self.max_length}"
            )

    def text_towers(self) -> list[tuple[Any, nn.Module]]:
        """Every (tokenizer, text encoder) a prompt goes through, in order: the audit's
        embedding attacks put learned input embeddings into each one's embedding table."""
        raise ModelLoadError(
            f"{type(self).__name__} does not declare its text encoders (text_towers): "
            "the audit's embedding attacks cannot run on this model"
        )

    @contextmanager
    def differentiable(self) -> Iterator[None]:
        """Inside, ``encode`` and ``conditioning`` record gradients (``grad``)."""
        before, self.grad = self.grad, True
        try:
            yield
        finally:
            self.grad = before

    # ------------------------------------------------------------ token positions
    # Stage 1's alignment and Eq. 3's token masks go by position. The defaults are those of
    # one CLIP tokenizer (start and end tokens, ``max_length`` positions); a family whose
    # context is laid out otherwise (T5's, SD 3.x's CLIP + T5 sequence) overrides them.

    @property
    def tokens(self) -> int:
        """Text positions the denoiser's attention sees: the length of Eq. 3's token masks."""
        return self.max_length

    def content_ids(self, text: str) -> list[int]:
        """The ids of ``text`` alone, without start / end tokens: what it is inside a prompt."""
        return self.ids(text)[1:-1]

    def align(self, concept_prompt: str, anchor_prompt: str) -> Alignment:
        """Stage 1's aligned pairs of a prompt and its anchor twin, as rows of ``encode``."""
        return align_tokens(self.ids(concept_prompt), self.ids(anchor_prompt), self.max_length)

    def concept_mask(self, prompt: str, text: str) -> torch.Tensor | None:
        """(tokens,) bool: every position of every occurrence of ``text``'s tokens in ``prompt``
        (None when it does not occur)."""
        ids, sub = self.ids(prompt), self.content_ids(text)
        starts = find_subsequences(ids, sub)
        if not starts:
            return None
        mask = torch.zeros(self.tokens, dtype=torch.bool)
        for start in starts:
            mask[start : start + len(sub)] = True
        return mask

    def end_mask(self, prompt: str) -> torch.Tensor:
        """(tokens,) bool: end-of-text and all padding after it, by position (the pad token
        may be anything: SD 2.x pads with '!', id 0, which a prompt can contain too)."""
        mask = torch.zeros(self.tokens, dtype=torch.bool)
        mask[len(self.ids(prompt)) - 1 :] = True
        return mask

    # ------------------------------------------------------------ the denoiser
    # What the method does to the denoiser goes through these, so that a family whose text
    # reaches it otherwise (an MMDiT's context_embedder) needs no change elsewhere.

    def edited_projections(self, model: nn.Module) -> Projections:
        """The projections MACE edits in the denoiser ``model``: every attn2 to_k / to_v of a UNet."""
        return Projections.full(attn2_projections(model))

    def attention_probes(self, model: nn.Module, bank: LoraBank | None = None) -> AbstractContextManager:
        """Inside: per attention layer, the probabilities of image queries over the text tokens
        (Eq. 3's A_l, (batch, heads, queries, tokens)) appended to the yielded list, and the
        ``bank``'s LoRAs added to the trained projections."""
        return cross_attention_probes(model, bank)

    def memory_saving(self, model: nn.Module, device: torch.device) -> AbstractContextManager:
        """Inside, LoRA training keeps less of the denoiser's activations (same results); a UNet
        needs nothing."""
        return nullcontext()

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
    # Extra keyword arguments of the pipeline's from_pretrained.
    load_kwargs: ClassVar[dict[str, Any]] = {}
    # The pipeline component (its folder in a diffusers model) that holds the projections
    # MACE edits: every other component of an erased model is the source's, byte for byte.
    edited_component: ClassVar[str] = "unet"
    # The half precision generation autocasts to on GPUs (T5 encoders overflow in fp16).
    half_dtype: ClassVar[torch.dtype] = torch.float16
    # Whether a GPU worker holds the denoiser's frozen weights in ``half_dtype`` under
    # ``--precision auto`` (``ConceptBatchWorker``): where the fp32 weights would not fit one
    # GPU beside the text encoders. The closed forms still take W in fp32 (taken before).
    half_weights: ClassVar[bool] = False
    # The text side: the transformers classes (tokenizer, text encoder) of each text encoder,
    # in diffusers' order: the first in tokenizer/ and text_encoder/, the next in tokenizer_2/
    # and text_encoder_2/, ... (``text_folders``).
    text_side: ClassVar[TextSide]

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

    def load_text_components(self, model: str) -> tuple[Any, ...]:
        """Only the text side, as ``prompt_encoder`` takes them: every tokenizer, then every text
        encoder in TEXT_DTYPE whatever dtype it was saved in (``text_side``).
        Enough to validate prompts, fingerprint a model and compute the text statistics."""
        if model == TINY_MODEL:
            return self.text_components(self.build_tiny_pipeline())
        import transformers

        source, is_local = resolve_source(model)
        kw: dict[str, Any] = dict(local_files_only=is_local)
        # In TEXT_DTYPE: transformers would keep the checkpoint's own (fp16) dtype.
        te_kw = dict(kw, use_safetensors=True, dtype=TEXT_DTYPE)
        try:
            sides = list(zip(self.text_folders(), self.text_side, strict=True))
            toks = [
                getattr(transformers, tok).from_pretrained(source, subfolder=tf, **kw)
                for (tf, _), (tok, _) in sides
            ]
            encs = [
                getattr(transformers, enc).from_pretrained(source, subfolder=ef, **te_kw)
                for (_, ef), (_, enc) in sides
            ]
        except Exception as e:
            raise load_error(model, e) from None
        return (*toks, *(e.eval() for e in encs))

    def text_components(self, pipe: Any) -> tuple[Any, ...]:
        """The same components of a loaded pipeline."""
        folders = self.text_folders()
        return tuple(getattr(pipe, folder) for folder in (*(t for t, _ in folders), *(e for _, e in folders)))

    def text_folders(self) -> list[tuple[str, str]]:
        """The (tokenizer, text encoder) folders of ``text_side``'s pairs, as diffusers names them."""
        return [(f"tokenizer{s}", f"text_encoder{s}") for s in ("", "_2", "_3", "_4")[: len(self.text_side)]]

    @abstractmethod
    def prompt_encoder(
        self, components: tuple[Any, ...], device: torch.device, batch_size: int = 64
    ) -> PromptEncoder:
        """The PromptEncoder of text components (from ``load_text_components`` or ``text_components``)."""

    # ------------------------------------------------------------ UNet

    def attn2_projections(self, unet: nn.Module) -> dict[str, nn.Linear]:
        """The cross-attention to_k / to_v layers MACE edits, keyed by state-dict name, sorted."""
        return attn2_projections(unet)

    def denoiser(self, pipe: Any) -> nn.Module:
        """The pipeline's denoiser: its ``edited_component`` (the UNet, or an MMDiT transformer)."""
        return getattr(pipe, self.edited_component)

    def edited_projections(self, denoiser: nn.Module) -> Projections:
        """The projections MACE edits (state-dict keys inside ``edited_component``): every attn2
        to_k / to_v of a UNet. The same as the family's PromptEncoder gives."""
        return Projections.full(attn2_projections(denoiser))

    def training_schedule(self, pipe: Any) -> Any:
        """How LoRA training noises latents (``mace_core.noise``): a UNet's DDPM schedule."""
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(pipe.scheduler.config)

    def native_size(self, pipe: Any) -> int:
        """The model's default image size in pixels."""
        return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)

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
        CPU (``initial_noise``), so an image does not depend on the batch it is in. The
        family's sampler (``use_dpm_solver``: DPM-Solver, or a flow model's own scheduler)
        and guidance (``pipeline_kwargs``); ``on_step(i)`` after denoising step i.
        """
        self.use_dpm_solver(pipe)
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        dtype = self.denoiser(pipe).dtype
        noise = initial_noise(gens, self.latent_shape(pipe, height, width), dtype)
        steps, kwargs = self.pipeline_kwargs(pipe, noise, steps, guidance)

        def callback(pipe: Any, i: int, t: Any, kw: dict) -> dict:
            if on_step is not None:
                on_step(i)
            return kw

        images = pipe(
            prompt=list(prompts),
            num_inference_steps=steps,
            generator=gens,  # stochastic schedulers draw their step noise from them
            height=height,
            width=width,
            output_type="np",
            callback_on_step_end=callback if on_step is not None else None,
            **kwargs,
        ).images
        return checked_images(images, prompts[0], dtype)

    def latent_shape(self, pipe: Any, height: int, width: int) -> tuple[int, int, int]:
        """(C, h, w) of one image's latent."""
        scale = int(pipe.vae_scale_factor)
        return (int(self.denoiser(pipe).config.in_channels), height // scale, width // scale)

    def pipeline_kwargs(
        self, pipe: Any, noise: torch.Tensor, steps: int, guidance: float
    ) -> tuple[int, dict[str, Any]]:
        """(steps, pipeline arguments) for one call: latents from ``noise`` (N, C, h, w) and the
        family's guidance (a UNet's: classifier-free guidance at ``guidance``)."""
        return steps, {"latents": noise, "guidance_scale": guidance}


def checked_images(images: np.ndarray, prompt: str, dtype: torch.dtype) -> np.ndarray:
    """A pipeline's float images in [0, 1] as uint8; non-finite pixels are a GenerationError."""
    if not np.isfinite(images).all():
        raise GenerationError(
            f"non-finite pixels generating {quoted(prompt)} with a {dtype} pipeline"
            + (" (fp16 overflow? use float32)" if dtype == torch.float16 else "")
        )
    return (np.clip(images, 0.0, 1.0) * 255).round().astype(np.uint8)


def load_error(model: str, e: Exception) -> ModelLoadError:
    """A loader's exception as one line naming ``model``."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return ModelLoadError(f"model {model!r} cannot be loaded: {first[:300]}")
