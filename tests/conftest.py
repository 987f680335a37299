"""Shared fixtures: the built-in tiny random pipeline and the real CLIP tokenizer."""

from __future__ import annotations

import pytest
import torch

from mace_core.models import build_tiny_pipeline, clip_tokenizer
from mace_core.text_stats import TextEncoder


@pytest.fixture(scope="session")
def tokenizer():
    return clip_tokenizer()


@pytest.fixture(scope="session")
def tiny_pipe():
    """Shared tiny pipeline; tests must leave its weights as they found them."""
    return build_tiny_pipeline(seed=0)


@pytest.fixture(scope="session")
def encoder(tiny_pipe):
    return TextEncoder(tiny_pipe.tokenizer, tiny_pipe.text_encoder, torch.device("cpu"))
