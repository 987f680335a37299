"""Joint-attention probes of MMDiT transformers (FLUX.1 double-stream blocks, SD 3.x joint
blocks) and the LoRAs on their text projections: what Eq. 3 needs from a transformer.

In a joint block the image tokens and the text tokens attend together over the concatenated
sequence. The probe computes that softmax explicitly and records the block of it where
image queries look at text keys, (batch, heads, image queries, text tokens): the A_l of
Eq. 3, shaped as an SD attn2's probabilities, so the loss and the attention mass are the
same code. The rows of that block do not sum to 1 (image keys take the rest). Only the
joint blocks are probed: FLUX's single-stream blocks mix the two streams into one, as the
issue's formulation leaves them.

A concept's LoRA sits on the text projection(s) (``context_embedder``) as a forward hook:
out + B_s A_s x for sample s's adapter, the same sum an attn2 probe adds to to_k / to_v.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from mace_core.attention import AttentionProbe
from mace_core.lora import LoraBank


def _probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) over keys, in float32 then back to q's dtype; q, k (b, h, s, d)."""
    scores = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    return scores.float().softmax(-1).to(q.dtype)


class FluxJointProbe(AttentionProbe):
    """Processor of a FLUX double-stream block's FluxAttention (text first in the sequence)."""

    def probe(
        self,
        attn,
        hidden_states: torch.Tensor,
        context: torch.Tensor | None,
        mask: torch.Tensor | None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        from diffusers.models.embeddings import apply_rotary_emb

        if context is None or mask is not None or attn.fused_projections:
            raise RuntimeError(
                "FluxJointProbe supports the unfused joint attention of double-stream blocks only"
            )
        d = attn.head_dim
        q = attn.norm_q(attn.to_q(hidden_states).unflatten(-1, (-1, d)))
        k = attn.norm_k(attn.to_k(hidden_states).unflatten(-1, (-1, d)))
        v = attn.to_v(hidden_states).unflatten(-1, (-1, d))
        eq = attn.norm_added_q(attn.add_q_proj(context).unflatten(-1, (-1, d)))
        ek = attn.norm_added_k(attn.add_k_proj(context).unflatten(-1, (-1, d)))
        ev = attn.add_v_proj(context).unflatten(-1, (-1, d))
        q, k, v = (torch.cat(p, dim=1) for p in ((eq, q), (ek, k), (ev, v)))  # (b, s, h, d)
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # (b, h, s, d)
        n_txt = context.shape[1]
        probs = _probs(q, k)
        self.store.append(probs[:, :, n_txt:, :n_txt])
        out = (probs @ v).transpose(1, 2).flatten(2, 3).to(q.dtype)
        text, image = out[:, :n_txt], out[:, n_txt:]
        return attn.to_out[1](attn.to_out[0](image.contiguous())), attn.to_add_out(text.contiguous())


class SD3JointProbe(AttentionProbe):
    """Processor of an SD 3.x joint block's Attention (image first in the sequence)."""

    def probe(
        self, attn, hidden_states: torch.Tensor, context: torch.Tensor | None, mask: torch.Tensor | None
    ):
        if context is None or mask is not None:
            raise RuntimeError("SD3JointProbe supports the joint attention of SD 3.x blocks only")
        b, n_img = hidden_states.shape[:2]
        h = attn.heads

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(b, -1, h, x.shape[-1] // h).transpose(1, 2)

        q, k, v = (
            heads(attn.to_q(hidden_states)),
            heads(attn.to_k(hidden_states)),
            heads(attn.to_v(hidden_states)),
        )
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        e = context
        eq, ek, ev = heads(attn.add_q_proj(e)), heads(attn.add_k_proj(e)), heads(attn.add_v_proj(e))
        if attn.norm_added_q is not None:
            eq = attn.norm_added_q(eq)
        if attn.norm_added_k is not None:
            ek = attn.norm_added_k(ek)
        q, k, v = torch.cat([q, eq], dim=2), torch.cat([k, ek], dim=2), torch.cat([v, ev], dim=2)
        probs = _probs(q, k)
        self.store.append(probs[:, :, :n_img, n_img:])
        out = (probs @ v).transpose(1, 2).reshape(b, -1, h * q.shape[-1]).to(q.dtype)
        image, text = out[:, :n_img], out[:, n_img:]
        if not attn.context_pre_only:
            text = attn.to_add_out(text)
        return attn.to_out[1](attn.to_out[0](image)), text


@contextmanager
def lora_hooks(modules: dict[str, nn.Linear], bank: LoraBank | None) -> Iterator[None]:
    """Inside, each layer of ``modules`` (key -> layer) adds its per-sample LoRA of ``bank``."""
    handles = []
    if bank is not None:
        for key, module in modules.items():

            def hook(mod: nn.Module, args: tuple, out: torch.Tensor, key: str = key) -> torch.Tensor:
                return out + bank.delta(key, args[0])

            handles.append(module.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# The processors of the joint blocks: FLUX's double-stream and SD 3.x's blocks are both
# ``transformer_blocks.<i>.attn`` (SD 3.5's extra self-attention ``attn2`` is image-only).
JOINT_PROCESSOR = re.compile(r"transformer_blocks\.\d+\.attn\.processor")


@contextmanager
def joint_attention_probes(
    model: nn.Module, trained: dict[str, nn.Linear], bank: LoraBank | None = None
) -> Iterator[list[torch.Tensor]]:
    """Probes on every joint block of an MMDiT ``model`` (FLUX.1 or SD 3.x); yields the list
    they append image-query -> text-token probabilities to, in forward order (clear it
    between steps). ``bank``'s LoRAs act on the ``trained`` layers meanwhile."""
    original = dict(model.attn_processors)
    store: list[torch.Tensor] = []
    probe = FluxJointProbe if type(model).__name__.startswith("Flux") else SD3JointProbe
    procs = {name: (probe(store) if JOINT_PROCESSOR.fullmatch(name) else p) for name, p in original.items()}
    if not any(isinstance(p, probe) for p in procs.values()):
        raise RuntimeError(f"{type(model).__name__} has no joint-attention blocks to probe")
    model.set_attn_processor(procs)
    try:
        with lora_hooks(trained, bank):
            yield store
    finally:
        model.set_attn_processor(original)
