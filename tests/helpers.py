"""Helpers shared by the end-to-end tests: small runs of the tiny model and their results."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import torch

from mace_core.checkpoints import read_erasure
from mace_core.concepts import ConceptType
from mace_core.settings import DataSettings, EraseSettings, MaskSettings, TrainSettings

CONCEPTS = "Bill Clinton | celebrity\nVan Gogh | style\nairplane | object | sky\nAngelina Jolie | celebrity\n"
SETTINGS = EraseSettings(
    train=TrainSettings(steps=3),
    data=DataSettings(images_per_concept=2, inference_steps=3),
    masks=MaskSettings(masker="whole-image"),
    prompts_per_concept=4,
)
# The same settings as command-line flags.
FLAGS = [
    "--model", "tiny", "--images", "2", "--inference-steps", "3", "--train-steps", "3",
    "--prompts-per-concept", "4", "--masker", "whole-image",
]  # fmt: skip
MACE_RAY = str(Path(sys.executable).parent / "mace-ray")


def request(concept_file: Path, output: Path, **kw):
    from mace_ray.erase import EraseRequest

    return EraseRequest(
        concept_file=str(concept_file),
        model="tiny",
        output=str(output),
        default_type=ConceptType.OBJECT,
        settings=SETTINGS,
        **kw,
    )


def erasure(root: Path) -> dict[str, torch.Tensor]:
    return read_erasure((Path(root) / "final" / "erasure.safetensors").read_bytes())[0]


def assert_same_erasure(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=0), (k, (a[k] - b[k]).abs().max())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_with_venv() -> dict[str, str]:
    """The environment for Ray processes and jobs: this venv first on PATH, auth off."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_AUTH_MODE"] = "disabled"
    env.pop("RAY_ADDRESS", None)
    return env


def report(root: Path) -> dict:
    return json.loads((Path(root) / "report.json").read_text())


def ray_binary() -> str:
    return (
        str(Path(sys.executable).parent / "ray") if (Path(sys.executable).parent / "ray").exists() else "ray"
    )


def run_cli(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([MACE_RAY, *args], capture_output=True, text=True, timeout=timeout, env=env)


def copy_run(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst)
