"""Feature extractors for FID: the FID Inception-v3 (pool3, 2048-d) or CLIP image features.

Inception: the network of pytorch-fid (the TensorFlow FID Inception ported to PyTorch: the
torchvision Inception-v3 with pytorch-fid's patched FIDInception blocks), built here without
any download, with weights read from a local ``.safetensors`` file (mace-ray never unpickles;
the one-time conversion of pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` is in
README.md, "Evaluation"). Images are resized to 299 x 299 (bilinear) and scaled to [-1, 1], exactly
as pytorch-fid does, so the features and FID values are comparable to its numbers.

CLIP: the projected image embeddings of the scoring CLIP (no weights beyond CLIP needed).
FIDs on CLIP features are on another scale than Inception FIDs (not comparable to the paper's).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mace_core.errors import ModelLoadError
from mace_core.evaluation.clip_model import ClipModel
from mace_core.evaluation.errors import EvalInputError, MetricUnavailableError

INCEPTION_DIM = 2048


class FeatureExtractor(Protocol):
    name: str

    def __call__(self, images: list[np.ndarray]) -> torch.Tensor: ...


def build_fid_inception() -> nn.Module:
    """The FID Inception-v3 architecture (pytorch-fid's ``fid_inception_v3`` minus its download)."""
    try:
        import torchvision
        from pytorch_fid.inception import FIDInceptionA, FIDInceptionC, FIDInceptionE_1, FIDInceptionE_2
    except ImportError as e:
        raise MetricUnavailableError(
            f"FID Inception needs pytorch-fid and torchvision ({e}); pip install pytorch-fid"
        ) from None
    net = torchvision.models.inception_v3(
        weights=None, aux_logits=False, num_classes=1008, init_weights=False
    )
    net.Mixed_5b = FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = FIDInceptionE_1(1280)
    net.Mixed_7c = FIDInceptionE_2(2048)
    return net.eval()


def check_inception_weights(path: str) -> Path:
    """The weights file must exist and be safetensors; errors name it (checked before any work)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise EvalInputError(f"FID Inception weights {path!r} do not exist or are not a file")
    if p.suffix != ".safetensors":
        raise EvalInputError(
            f"FID Inception weights {path!r}: only .safetensors files are read (mace-ray never unpickles); "
            "convert pytorch-fid's .pth once as the README's Evaluation section shows"
        )
    return p


class InceptionFeatures:
    """Pool3 features (N, 2048) of the FID Inception-v3, weights from a safetensors file."""

    name = "inception"

    def __init__(self, weights: str, device: torch.device, batch_size: int = 32) -> None:
        from safetensors.torch import load_file

        path = check_inception_weights(weights)
        try:
            state = load_file(str(path))
        except Exception as e:
            raise ModelLoadError(f"FID Inception weights {weights!r} cannot be read: {e}") from None
        net = build_fid_inception()
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as e:
            first = str(e).splitlines()[0]
            raise ModelLoadError(
                f"FID Inception weights {weights!r} do not fit the FID Inception-v3: {first}"
            ) from None
        self.net = net.to(device)
        self.device = device
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, images: list[np.ndarray]) -> torch.Tensor:
        out = []
        n = self.net
        for i in range(0, len(images), self.batch_size):
            # Each image to [0, 1], resized to 299 on its own (sizes may differ), then [-1, 1].
            xs = [
                F.interpolate(
                    torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1)[None].float().div(255.0),
                    size=(299, 299),
                    mode="bilinear",
                    align_corners=False,
                )
                for im in images[i : i + self.batch_size]
            ]
            x = torch.cat(xs).to(self.device) * 2 - 1
            x = n.maxpool1(n.Conv2d_2b_3x3(n.Conv2d_2a_3x3(n.Conv2d_1a_3x3(x))))
            x = n.maxpool2(n.Conv2d_4a_3x3(n.Conv2d_3b_1x1(x)))
            for block in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
                x = getattr(n, f"Mixed_{block}")(x)
            out.append(F.adaptive_avg_pool2d(x, (1, 1)).flatten(1).double().cpu())
        return torch.cat(out) if out else torch.zeros(0, INCEPTION_DIM, dtype=torch.float64)


class ClipImageFeatures:
    """CLIP projected image embeddings as FID features (a documented alternative to Inception)."""

    name = "clip"

    def __init__(self, clip: ClipModel) -> None:
        self.clip = clip

    def __call__(self, images: list[np.ndarray]) -> torch.Tensor:
        return self.clip.image_embeddings(images).double()


def load_fid_extractor(weights: str | None, clip: ClipModel, device: torch.device) -> FeatureExtractor:
    """Inception with ``weights`` (a .safetensors file), else CLIP image features."""
    if weights:
        return InceptionFeatures(weights, device)
    return ClipImageFeatures(clip)
