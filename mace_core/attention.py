"""Cross-attention probe: an attn2 processor that exposes the attention probabilities.

Installed with ``set_attn_processor`` over the full processor dict (only attn2 keys
change) and removed afterwards; self-attention keeps its fused kernel. The probe
computes softmax(Q K^T * scale) explicitly, because Eq. 3 needs the probabilities A_l
(queries x text tokens), and optionally adds a per-sample LoRA to K and V.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from mace_core.lora import LoraBank


class AttentionProbe(ABC):
    """An attention processor (diffusers' protocol) that computes the softmax explicitly and
    appends the probabilities of image queries over text tokens to ``store``: an attn2's here,
    an MMDiT joint block's in ``mace_core/joint_attention.py``."""

    def __init__(self, store: list[torch.Tensor]) -> None:
        self.store = store

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *args,
        **kwargs,
    ):
        # Other keyword arguments are ignored (diffusers passes a processor only those its
        # signature names); FLUX's rotary embedding comes positionally, in ``args``.
        return self.probe(attn, hidden_states, encoder_hidden_states, attention_mask, *args)

    @abstractmethod
    def probe(
        self, attn, hidden_states: torch.Tensor, context: torch.Tensor | None, mask: torch.Tensor | None
    ):
        """The attention's output of image tokens ``hidden_states`` and text tokens ``context``
        (``encoder_hidden_states``) under ``mask``; the probabilities appended to ``store``."""


class CrossAttnProbe(AttentionProbe):
    """attn2 processor: records per-layer probabilities, applies a LoraBank to to_k/to_v."""

    def __init__(self, prefix: str, store: list[torch.Tensor], bank: LoraBank | None) -> None:
        super().__init__(store)
        self.k_key = f"{prefix}.to_k.weight"
        self.v_key = f"{prefix}.to_v.weight"
        self.bank = bank

    def probe(
        self, attn, hidden_states: torch.Tensor, context: torch.Tensor | None, mask: torch.Tensor | None
    ) -> torch.Tensor:
        if context is None:
            raise RuntimeError("CrossAttnProbe is for cross-attention (attn2) only")
        if attn.spatial_norm is not None or attn.group_norm is not None or hidden_states.ndim != 3:
            raise RuntimeError("CrossAttnProbe supports the transformer-block attn2 of SD UNets only")
        residual = hidden_states
        b, n_q, _ = hidden_states.shape
        e = context
        if attn.norm_cross:
            e = attn.norm_encoder_hidden_states(e)
        q = attn.to_q(hidden_states)
        k = attn.to_k(e)
        v = attn.to_v(e)
        if self.bank is not None:
            k = k + self.bank.delta(self.k_key, e)
            v = v + self.bank.delta(self.v_key, e)
        h = attn.heads
        q, k, v = (z.view(b, -1, h, z.shape[-1] // h).transpose(1, 2) for z in (q, k, v))
        scores = (q @ k.transpose(-1, -2)) * attn.scale
        if mask is not None:
            mask = attn.prepare_attention_mask(mask, k.shape[2], b)
            scores = scores + mask.view(b, h, -1, k.shape[2])
        probs = scores.float().softmax(-1).to(q.dtype)  # (b, heads, queries, tokens)
        self.store.append(probs)
        out = (probs @ v).transpose(1, 2).reshape(b, n_q, -1)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


@contextmanager
def cross_attention_probes(unet: nn.Module, bank: LoraBank | None = None) -> Iterator[list[torch.Tensor]]:
    """Install probes on every attn2; yields the list they append probabilities to.

    The list is in forward order (one entry per attn2 call); clear it between steps.
    """
    original = dict(unet.attn_processors)
    store: list[torch.Tensor] = []
    procs = {}
    for name, proc in original.items():
        if name.endswith("attn2.processor"):
            procs[name] = CrossAttnProbe(name[: -len(".processor")], store, bank)
        else:
            procs[name] = proc
    unet.set_attn_processor(procs)
    try:
        yield store
    finally:
        unet.set_attn_processor(original)
