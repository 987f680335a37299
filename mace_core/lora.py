"""Rank-r LoRA on the edited projections (attn2 to_k / to_v of SD; an MMDiT's context_embedder),
one adapter per concept, batched per sample.

dW = B A (A: r x d_in, B: d_out x r), the usual LoRA with scale 1 (alpha = r), B = 0 at
the start. A starts Gaussian with std 1/r, as diffusers' LoRALinearLayer draws it and
the paper's experiments train it (``init="gaussian"``), or Kaiming-uniform as PEFT's
default (``init="kaiming"``). A bank holds K adapters stacked on a leading axis; sample
b of a UNet batch uses adapter ``slot[b]``, so K concepts train in one batch with
exactly the gradients of K separate runs (attention and GroupNorm act per sample).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from mace_core.errors import ArtefactError
from mace_core.projections import pad_columns
from mace_core.sealed import open_sealed, sealed_bytes
from mace_core.settings import LORA_INITS


@dataclass
class LoraFactors:
    """One concept's LoRA: ``factors[proj_key] = (A, B)`` with dW = B @ A (float32, CPU).

    A is in the token-state space of the closed forms (``mace_core.projections``): for a
    projection that reads only a block of it (an MMDiT's context_embedder), A is zero outside
    that block, recorded in ``columns`` as (start, stop, width); the file holds the layer's
    own A (its input width), so diffusers / PEFT load it. ``component``: the pipeline
    component the LoRA's layers are in (the family's ``edited_component``).
    """

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    component: str = "unet"
    columns: dict[str, tuple[int, int, int]] = field(default_factory=dict)

    def delta(self, key: str) -> torch.Tensor:
        A, B = self.factors[key]
        return B @ A

    def layer_factors(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of one layer with A at the layer's own input width."""
        A, B = self.factors[key]
        if key in self.columns:
            start, stop, _ = self.columns[key]
            A = A[:, start:stop]
        return A, B

    @property
    def rank(self) -> int:
        return next(iter(self.factors.values()))[0].shape[0] if self.factors else 0

    def to_bytes(self, metadata: dict[str, str] | None = None) -> bytes:
        """A sealed safetensors file in the diffusers/PEFT LoRA convention: tensors
        ``unet.<module>.lora_A.weight`` / ``lora_B.weight`` and the adapter config under
        ``lora_adapter_metadata``, so ``pipe.load_lora_weights(path)`` loads it as a UNet
        adapter (diffusers reads it through PEFT)."""
        prefix = f"{self.component}."
        t = {}
        for k in self.factors:
            A, B = self.layer_factors(k)
            t[peft_key(k, "lora_A", prefix)] = A.contiguous()
            t[peft_key(k, "lora_B", prefix)] = B.contiguous()
        meta = {"format": "pt", LORA_METADATA: adapter_config(self.rank, self.factors, prefix)}
        if self.columns:  # only where A is padded: an SD LoRA file is what it always was
            meta[COLUMNS_METADATA] = json.dumps(self.columns, sort_keys=True)
        return sealed_bytes(t, {**meta, **(metadata or {})})

    @classmethod
    def from_bytes(cls, data: bytes, what: str = "LoRA") -> LoraFactors:
        t, meta = open_sealed(data, what)
        modules = sorted({k.rsplit(".lora_", 1)[0] for k in t})
        components = {m.split(".", 1)[0] for m in modules}
        if len(components) > 1:
            raise ArtefactError(f"{what} holds layers of several components: {sorted(components)}")
        component = components.pop() if components else "unet"
        try:
            columns = {k: tuple(v) for k, v in json.loads(meta.get(COLUMNS_METADATA, "{}")).items()}
            factors = {}
            for m in modules:
                key = f"{m.removeprefix(component + '.')}.weight"
                A, B = t[f"{m}.lora_A.weight"], t[f"{m}.lora_B.weight"]
                if key in columns:
                    start, stop, width = columns[key]
                    A = pad_columns(A, (start, stop), width)
                factors[key] = (A, B)
        except KeyError as e:
            raise ArtefactError(f"{what} lacks tensor {e}") from None
        except (ValueError, TypeError, RuntimeError):
            raise ArtefactError(f"{what} has malformed {COLUMNS_METADATA} metadata") from None
        return cls(factors, component, columns)


# The diffusers/PEFT naming of a UNet LoRA (what StableDiffusionPipeline.load_lora_weights reads);
# an MMDiT's LoRA is named by its component the same way ("transformer.").
UNET_PREFIX = "unet."
LORA_METADATA = "lora_adapter_metadata"  # diffusers' safetensors metadata key for the adapter config
COLUMNS_METADATA = "mace_columns"  # where a padded A's block is (LoraFactors.columns)


def peft_key(weight_key: str, part: str, prefix: str = UNET_PREFIX) -> str:
    """``down...attn2.to_k.weight`` -> ``unet.down...attn2.to_k.lora_A.weight``."""
    return f"{prefix}{weight_key.removesuffix('.weight')}.{part}.weight"


def adapter_config(
    rank: int, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], prefix: str = UNET_PREFIX
) -> str:
    """The PEFT LoraConfig of these factors, as diffusers stores it: scale alpha / r = 1 (dW =
    B A), on exactly these modules. Built through PEFT so that every field is one it accepts."""
    from peft import LoraConfig

    modules = sorted(k.removesuffix(".weight") for k in factors)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=modules, init_lora_weights="gaussian")
    kept = {"r": config.r, "lora_alpha": config.lora_alpha, "target_modules": modules}
    kept["init_lora_weights"] = config.init_lora_weights
    return json.dumps({f"{prefix}{k}": v for k, v in kept.items()}, sort_keys=True)


def init_lora_a(rank: int, d_in: int, g: torch.Generator, init: str = "gaussian") -> torch.Tensor:
    """A LoRA down-projection A (rank x d_in) at its start.

    "gaussian": N(0, (1/rank)^2), the scale diffusers' LoRALinearLayer uses and the paper's
    experiments trained with; "kaiming": uniform in +-1/sqrt(d_in) (PEFT's default), about
    sqrt(d_in) / rank times smaller (48x on SD 1.x, d_in = 768 at rank 1), so that with
    B = 0 and AdamW the same learning rate moves dW = B A that much less.
    """
    if init == "gaussian":
        return torch.randn(rank, d_in, generator=g) / rank
    bound = 1.0 / math.sqrt(d_in)
    return (torch.rand(rank, d_in, generator=g) * 2 - 1) * bound


class LoraBank(nn.Module):
    """K stacked rank-r adapters for each trained projection (keys as in ``Projections``), at
    each layer's own input width."""

    def __init__(
        self,
        shapes: dict[str, tuple[int, int]],
        k: int,
        rank: int,
        generators: list[torch.Generator],
        device: torch.device,
        init: str = "gaussian",
    ) -> None:
        super().__init__()
        if len(generators) != k:
            raise ValueError(f"need one generator per adapter, got {len(generators)} for {k}")
        self.keys = list(shapes)
        self.A = nn.ParameterList()
        self.B = nn.ParameterList()
        if init not in LORA_INITS:
            raise ValueError(f"unknown LoRA init {init!r} (valid: {', '.join(LORA_INITS)})")
        for d_out, d_in in shapes.values():
            # Drawn per adapter from its own generator, so an adapter's start does not
            # depend on its batch mates (batched == separate runs).
            A = torch.stack([init_lora_a(rank, d_in, g, init) for g in generators])
            self.A.append(nn.Parameter(A.to(device)))
            self.B.append(nn.Parameter(torch.zeros(k, d_out, rank, device=device)))
        self.index = {key: i for i, key in enumerate(self.keys)}
        self.slot: torch.Tensor | None = None  # (batch,) adapter index per sample

    def delta(self, key: str, e: torch.Tensor) -> torch.Tensor:
        """(e A_s^T) B_s^T for each sample's adapter s; e is (batch, tokens, d_in)."""
        if self.slot is None:
            raise RuntimeError("LoraBank.slot must be set before a forward pass")
        i = self.index[key]
        A = self.A[i][self.slot]  # (batch, r, d_in)
        B = self.B[i][self.slot]  # (batch, d_out, r)
        return torch.einsum("bnr,bor->bno", torch.einsum("bnd,brd->bnr", e, A.to(e.dtype)), B.to(e.dtype))

    def clip_grad_per_adapter(self, max_norm: float) -> torch.Tensor:
        """``clip_grad_norm_`` applied to each adapter on its own; returns the K norms."""
        grads = [p.grad for p in list(self.A) + list(self.B) if p.grad is not None]
        if not grads:
            return torch.zeros(0)
        sq = torch.stack([g.pow(2).flatten(1).sum(1) for g in grads]).sum(0)  # (K,)
        norms = sq.sqrt()
        coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.view(-1, *([1] * (g.ndim - 1))))
        return norms

    def factors(self, j: int) -> LoraFactors:
        """Adapter j as plain CPU float32 factors."""
        return LoraFactors(
            {
                key: (
                    self.A[i][j].detach().float().cpu().clone(),
                    self.B[i][j].detach().float().cpu().clone(),
                )
                for key, i in self.index.items()
            }
        )
