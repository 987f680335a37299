"""The linear projections MACE edits, as a model family declares them, and their weights.

Every text token reaches the denoiser through image-independent linear maps, and those are
what the closed forms (CFR Eq. 2, fusion Eq. 7) and the LoRAs (Eq. 3) change: the attn2
to_k / to_v of an SD UNet; ``context_embedder`` (and the pooled text projection) of a FLUX.1
or SD 3.x transformer. A family's ``Projections`` name them by their state-dict key inside
the edited component (``unet`` / ``transformer``).

The closed forms work in one token-state space of width ``width`` (a family's
``PromptEncoder.encode``): every statistic is a sum of outer products of its rows. A
projection reads the block ``columns`` of it (all of it for SD; the T5 / joint context block
for ``context_embedder`` and the pooled block for the pooled projection). Weights in that
space ("statistics weights", what CFR, fusion and the erasure report use) are the layer's
weight with zero columns outside its block: a state of another block contributes nothing
through it, and as every statistic is block-diagonal (a row is a token state or a pooled
state, never both), the solves keep the blocks apart and the zero columns of a result are
dropped. A projection's bias is never changed; it cancels in every residual and drift,
which compare outputs of the same layer.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from mace_core.errors import ModelLoadError


@dataclass(frozen=True)
class Projection:
    """One edited linear layer: its columns of the token-state space and whether a concept's
    LoRA (Eq. 3) sits on it (the pooled projection is edited by the closed forms only)."""

    module: nn.Linear
    columns: tuple[int, int]  # (start, stop) in the token-state space
    lora: bool = True
    group: str = "context"  # the erasure report's group ("context" or "pooled")


class Projections(Mapping[str, Projection]):
    """The edited projections of one model, keyed by state-dict name (sorted), and the width
    of the token-state space they read."""

    def __init__(self, items: dict[str, Projection], width: int) -> None:
        if not items:
            raise ModelLoadError("the model has no projection for MACE to edit")
        for key, p in items.items():
            if not isinstance(p.module, nn.Linear):
                raise ModelLoadError(f"{key} is a {type(p.module).__name__}, expected a plain nn.Linear")
            start, stop = p.columns
            if stop - start != p.module.in_features or start < 0 or stop > width:
                raise ModelLoadError(
                    f"{key}: columns {p.columns} do not fit its input width {p.module.in_features}"
                )
        self.items_ = dict(sorted(items.items()))
        self.width = width

    @classmethod
    def full(cls, modules: dict[str, nn.Linear]) -> Projections:
        """Projections that all read the whole token-state space (SD's attn2 to_k / to_v)."""
        widths = {m.in_features for m in modules.values()}
        if len(widths) > 1:
            raise ModelLoadError(f"the edited projections take different input widths: {sorted(widths)}")
        width = widths.pop() if widths else 0
        return cls({k: Projection(m, (0, width)) for k, m in modules.items()}, width)

    def __getitem__(self, key: str) -> Projection:
        return self.items_[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.items_)

    def __len__(self) -> int:
        return len(self.items_)

    def padded(self, p: Projection) -> bool:
        """Whether ``p`` reads only a block of the space (its statistics weight has zero columns)."""
        return p.columns != (0, self.width)

    def trained(self) -> dict[str, nn.Linear]:
        """The layers a concept's LoRA sits on."""
        return {k: p.module for k, p in self.items_.items() if p.lora}

    def group(self, name: str) -> list[str]:
        return [k for k, p in self.items_.items() if p.group == name]

    def columns(self) -> dict[str, tuple[int, int, int]]:
        """(start, stop, width) of every projection that reads only a block of the space."""
        return {k: (*p.columns, self.width) for k, p in self.items_.items() if self.padded(p)}

    # ------------------------------------------------------------ weights

    def weights(self) -> dict[str, torch.Tensor]:
        """Statistics weights: copies (float32, CPU), zero outside each projection's columns."""
        out = {}
        for k, p in self.items_.items():
            w = p.module.weight.detach().float().cpu().clone()
            out[k] = pad_columns(w, p.columns, self.width) if self.padded(p) else w
        return out

    def shape(self, key: str) -> tuple[int, int]:
        """A statistics weight's shape: (out features, width)."""
        return (self.items_[key].module.out_features, self.width)

    def check(self, weights: Mapping[str, torch.Tensor], what: str = "weights") -> None:
        """Keys and statistics shapes of ``weights`` must be exactly these projections'."""
        missing, extra = set(self) - set(weights), set(weights) - set(self)
        if missing or extra:
            raise ModelLoadError(
                f"{what} do not match the model: {len(missing)} missing, {len(extra)} unexpected"
                f" (e.g. {sorted(missing or extra)[0]})"
            )
        for k in self:
            if tuple(weights[k].shape) != self.shape(k):
                raise ModelLoadError(f"{k}: shape {tuple(weights[k].shape)} != model {self.shape(k)}")

    def set_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Put statistics weights into the layers (in place): each layer takes its columns."""
        self.check(weights)
        with torch.no_grad():
            for k, p in self.items_.items():
                w = weights[k][:, p.columns[0] : p.columns[1]] if self.padded(p) else weights[k]
                p.module.weight.copy_(w.to(p.module.weight.device, p.module.weight.dtype))

    def component_tensors(self, weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Statistics weights as the component's own tensors (its state-dict shapes)."""
        self.check(weights)
        return {
            k: (weights[k][:, p.columns[0] : p.columns[1]].clone() if self.padded(p) else weights[k])
            for k, p in self.items_.items()
        }

    def from_component_tensors(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The component's tensors (state-dict shapes, as an erasure file holds them) as
        statistics weights."""
        missing, extra = set(self) - set(tensors), set(tensors) - set(self)
        if missing or extra:
            raise ModelLoadError(
                f"erased weights do not match the model: {len(missing)} missing, {len(extra)} unexpected"
                f" (e.g. {sorted(missing or extra)[0]})"
            )
        out = {}
        for k, p in self.items_.items():
            t = tensors[k].float()
            if tuple(t.shape) != tuple(p.module.weight.shape):
                raise ModelLoadError(f"{k}: shape {tuple(t.shape)} != model {tuple(p.module.weight.shape)}")
            out[k] = pad_columns(t, p.columns, self.width) if self.padded(p) else t
        return out

    @contextmanager
    def weights_set(self, weights: Mapping[str, torch.Tensor]) -> Iterator[None]:
        """Run the model with other statistics weights (original vs refined) inside."""
        saved = self.weights()
        self.set_weights(weights)
        try:
            yield
        finally:
            self.set_weights(saved)


def pad_columns(w: torch.Tensor, columns: tuple[int, int], width: int) -> torch.Tensor:
    """``w`` (rows x (stop - start)) placed at ``columns`` of a zero (rows x width) matrix."""
    out = torch.zeros(w.shape[0], width, dtype=w.dtype)
    out[:, columns[0] : columns[1]] = w
    return out
