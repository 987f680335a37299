"""The cross-attention (attn2) to_k / to_v projections of a UNet: where MACE edits a model.

Every UNet2DConditionModel family (SD 1.x, 2.x, XL) names them alike, so one rule serves
them all (``mace_core.families.base.ModelFamily.attn2_projections``). What a family edits is
its ``edited_projections`` (``mace_core.projections``): this rule for the UNet families; an
MMDiT (FLUX.1, SD 3.x, whose SD 3.5 blocks have an image-only self-attention named attn2)
declares its text projections instead.
"""

from __future__ import annotations

import torch
from torch import nn

from mace_core.errors import ModelLoadError


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
