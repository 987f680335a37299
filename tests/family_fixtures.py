"""The module-scoped fixtures of the family tests (tests/test_family_*.py): a family's tiny random
pipeline saved as a diffusers folder, and that folder loaded back, built once per test module."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mace_core.families.base import ModelFamily
from mace_core.models import load_pipeline


def tiny_folder_and_pipe(family: ModelFamily) -> tuple[Any, Any]:
    """The fixtures ``model_folder`` (``family``'s tiny pipeline saved as the diffusers folder
    ``tiny-<name>``, safetensors weights) and ``pipe`` (load_pipeline of that folder), both
    module-scoped; a test module binds them under those names: ``model_folder, pipe = ...``."""

    @pytest.fixture(scope="module")
    def model_folder(tmp_path_factory) -> Path:
        folder = tmp_path_factory.mktemp("model") / f"tiny-{family.name}"
        family.build_tiny_pipeline().save_pretrained(folder, safe_serialization=True)
        return folder

    @pytest.fixture(scope="module")
    def pipe(model_folder):
        return load_pipeline(str(model_folder))

    return model_folder, pipe
