"""What FLUX.1 and SD 3.x share: an MMDiT transformer whose only text inputs are two
image-independent linear maps, and a prompt encoder laid out in tokenizer segments.

Every text token enters the transformer through ``context_embedder`` (T5 states for FLUX.1,
SD 3.x's CLIP + T5 sequence -> transformer width); the pooled CLIP embedding enters every
block's modulation through ``time_text_embed.text_embedder.linear_1``. Those two are the
projections MACE edits (``mmdit_projections``), in one token-state space of width
``joint + pooled``: a context token is a row [state, 0], a prompt's pooled embedding a row
[0, pooled] (``mace_core.projections``), so CFR (Eq. 2) and fusion (Eq. 7) solve both at
once and keep them apart. The LoRAs (Eq. 3) sit on ``context_embedder`` only.

The context is laid out in segments, one per tokenizer (FLUX.1: T5; SD 3.x: CLIP, then
T5), each padded to its own length: Stage 1's alignment, the Eq. 3 token masks and the
length checks work segment by segment, by position (T5 has no start token, ends with
</s> and pads with <pad> = 0; CLIP starts with <|startoftext|>). ``encode`` gives every
context row, then the pooled row; the transformer attends to the context rows only
(``tokens``).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from mace_core.alignment import Alignment, align_tokens
from mace_core.cfis import flow_sigmas
from mace_core.errors import ConceptError, quoted
from mace_core.families.base import Conditioning, ModelFamily, PromptEncoder
from mace_core.joint_attention import joint_attention_probes
from mace_core.lora import LoraBank
from mace_core.noise import FlowSchedule
from mace_core.projections import Projection, Projections
from mace_core.token_positions import find_subsequences

CONTEXT_KEY = "context_embedder.weight"
POOLED_KEY = "time_text_embed.text_embedder.linear_1.weight"


def mmdit_projections(transformer: nn.Module) -> Projections:
    """context_embedder (columns [0, joint), with a LoRA) and the pooled text projection
    (columns [joint, joint + pooled), closed forms only)."""
    context = transformer.context_embedder
    pooled = transformer.time_text_embed.text_embedder.linear_1
    joint, width = context.in_features, context.in_features + pooled.in_features
    return Projections(
        {
            CONTEXT_KEY: Projection(context, (0, joint)),
            POOLED_KEY: Projection(pooled, (joint, width), lora=False, group="pooled"),
        },
        width,
    )


@dataclass(frozen=True)
class Segment:
    """One tokenizer's part of the context: rows ``offset .. offset + length``."""

    name: str  # for messages: "T5", "CLIP"
    offset: int
    length: int
    ids: Callable[[str], list[int]]  # unpadded ids with the tokenizer's special tokens
    start_token: bool  # whether ids begin with a start token (CLIP) or not (T5)

    def content(self, text: str) -> list[int]:
        """``text``'s ids alone: no start token, no end token."""
        return self.ids(text)[1 if self.start_token else 0 : -1]


def t5_length(t5_tok: Any, cap: int) -> int:
    """The T5 positions a prompt takes, in training and generation alike: the pipeline's
    ``max_sequence_length`` (``cap``), or the tokenizer's own limit where it is shorter."""
    return min(int(t5_tok.model_max_length), cap)


def tokenizer_ids(tokenizer: Any) -> Callable[[str], list[int]]:
    return lambda prompt: list(tokenizer(prompt, truncation=False).input_ids)


class MMDiTEncoder(PromptEncoder):
    """Token segments + a pooled row; the subclass encodes (``context``, ``pooled``) and calls
    the transformer. ``max_length`` is the T5 sequence length, ``tokens`` all context rows."""

    component: ClassVar[str] = "transformer"
    segments: list[Segment]
    limits: list[Segment]  # every tokenizer a prompt must fit (the pooled CLIP's too)
    joint: int  # context_embedder's input width
    pooled_width: int
    gradient_checkpointing: bool | None = None  # while training; None: on CUDA only

    @property
    def dim(self) -> int:
        return self.joint + self.pooled_width

    @property
    def tokens(self) -> int:
        return sum(s.length for s in self.segments)

    @abstractmethod
    def context_and_pooled(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, tokens, joint) context and (N, pooled) pooled embeddings, float32 on the CPU."""

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """(N, tokens + 1, dim): the context rows [state, 0], then the pooled row [0, pooled]."""
        out = []
        for i in range(0, len(prompts), self.batch_size):
            context, pooled = self.context_and_pooled(prompts[i : i + self.batch_size])
            rows = torch.zeros(len(context), self.tokens + 1, self.dim)
            rows[:, : self.tokens, : self.joint] = context
            rows[:, self.tokens, self.joint :] = pooled
            out.append(rows)
        return torch.cat(out)

    def conditioning(self, prompts: Sequence[str]) -> Conditioning:
        context, pooled = [], []
        for i in range(0, len(prompts), self.batch_size):
            c, p = self.context_and_pooled(prompts[i : i + self.batch_size])
            context.append(c)
            pooled.append(p)
        return {"context": torch.cat(context), "pooled": torch.cat(pooled)}

    def check_length(self, prompt: str, what: str) -> None:
        for seg in self.limits:
            n = len(seg.ids(prompt))
            if n > seg.length:
                raise ConceptError(
                    f"{what}: prompt {quoted(prompt)} is {n} {seg.name} tokens, the model takes {seg.length}"
                )

    def align(self, concept_prompt: str, anchor_prompt: str) -> Alignment:
        """Each segment aligned on its own (prefix, suffix, padding in order), then the pooled
        rows paired: a prompt's pooled embedding maps onto its anchor twin's."""
        f: list[int] = []
        g: list[int] = []
        dropped: list[int] = []
        for seg in self.segments:
            al = align_tokens(seg.ids(concept_prompt), seg.ids(anchor_prompt), seg.length)
            f += [seg.offset + i for i in al.concept_positions]
            g += [seg.offset + i for i in al.anchor_positions]
            dropped += [seg.offset + i for i in al.concept_tokens]
        return Alignment([*f, self.tokens], [*g, self.tokens], dropped)

    def concept_mask(self, prompt: str, text: str) -> torch.Tensor | None:
        """Every occurrence of ``text`` in every segment (None unless it is in each)."""
        mask = torch.zeros(self.tokens, dtype=torch.bool)
        for seg in self.segments:
            sub = seg.content(text)
            starts = find_subsequences(seg.ids(prompt), sub)
            if not starts:
                return None
            for start in starts:
                mask[seg.offset + start : seg.offset + start + len(sub)] = True
        return mask

    def end_mask(self, prompt: str) -> torch.Tensor:
        """End token and padding of every segment."""
        mask = torch.zeros(self.tokens, dtype=torch.bool)
        for seg in self.segments:
            mask[seg.offset + len(seg.ids(prompt)) - 1 : seg.offset + seg.length] = True
        return mask

    def edited_projections(self, model: nn.Module) -> Projections:
        return mmdit_projections(model)

    def attention_probes(self, model: nn.Module, bank: LoraBank | None = None) -> AbstractContextManager:
        return joint_attention_probes(model, mmdit_projections(model).trained(), bank)

    @contextmanager
    def memory_saving(self, model: nn.Module, device: torch.device) -> Iterator[None]:
        """Gradient checkpointing of the transformer blocks while LoRAs train: on CUDA (or where
        ``gradient_checkpointing`` says), since a 1024 px FLUX.1 / SD 3.x forward keeps tens of
        GB of activations per sample. Non-reentrant (diffusers' default): the probes' recorded
        probabilities keep their gradients, blocks are recomputed in the backward pass."""
        on = self.gradient_checkpointing if self.gradient_checkpointing is not None else device.type == "cuda"
        if not on or model.gradient_checkpointing:
            yield
            return
        model.enable_gradient_checkpointing()
        try:
            yield
        finally:
            model.disable_gradient_checkpointing()


class MMDiTFamily(ModelFamily):
    """A flow-matching MMDiT pipeline (FLUX.1, SD 3.x): transformer, VAE with a shift factor."""

    edited_component: ClassVar[str] = "transformer"
    half_dtype: ClassVar[torch.dtype] = torch.bfloat16  # T5 overflows in fp16
    # FLUX.1-dev's transformer is 47.6 GB in fp32 (23.8 in bf16, as it is published), T5-XXL 19
    # GB: in fp32, with Grounded-SAM and a 1024 px sample's ~12 GB of activations, more than
    # an 80 GB GPU holds.
    half_weights: ClassVar[bool] = True
    # The transformer's timestep input per unit of noise level: FLUX takes s, SD 3.x 1000 s.
    time_scale: ClassVar[float] = 1.0

    def load_pipeline(self, model: str, dtype: torch.dtype = torch.float32) -> Any:
        """As every family's, but half precision is bf16 (an fp16 request loads bf16)."""
        return super().load_pipeline(model, torch.bfloat16 if dtype == torch.float16 else dtype)

    def edited_projections(self, denoiser: nn.Module) -> Projections:
        return mmdit_projections(denoiser)

    def training_schedule(self, pipe: Any) -> FlowSchedule:
        """Rectified-flow noising at SD's noise levels (``mace_core.cfis.flow_sigmas``)."""
        return FlowSchedule(flow_sigmas(), self.time_scale)

    def native_size(self, pipe: Any) -> int:
        """The VAE's sample size: 1024 px for the released FLUX.1 / SD 3.x VAEs."""
        return int(pipe.vae.config.sample_size)

    def prediction_type(self, pipe: Any) -> str:
        return "flow"  # velocity of the rectified flow: the pipeline's own scheduler samples it

    def use_dpm_solver(self, pipe: Any) -> None:
        """Nothing: a flow model samples with its own scheduler (FlowMatchEuler)."""

    @abstractmethod
    def pipeline_kwargs(
        self, pipe: Any, noise: torch.Tensor, steps: int, guidance: float
    ) -> tuple[int, dict[str, Any]]:
        """The family's guidance and sequence length (and, FLUX.1-schnell, steps)."""

    def latent_shape(self, pipe: Any, height: int, width: int) -> tuple[int, int, int]:
        """(C, h, w) of one image's latent: the VAE's channels (the transformer may take patches)."""
        scale = int(pipe.vae_scale_factor)
        return (int(pipe.vae.config.latent_channels), height // scale, width // scale)
