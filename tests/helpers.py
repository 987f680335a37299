"""Helpers shared by the end-to-end tests: small runs of the tiny model and their results."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
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


def _image_stack(images) -> np.ndarray:
    """Images (H, W, C) or batches of them (N, H, W, C), in order, as one float64 stack."""
    return np.concatenate([np.asarray(x)[None] if np.ndim(x) == 3 else np.asarray(x) for x in images]).astype(
        np.float64
    )


def assert_same_seed_images(expected, got, max_mean_abs: float = 1.0, ratio: float = 0.1) -> None:
    """``got`` holds the same images as ``expected``, in the same order, up to kernel rounding.

    Both are sequences of images or of batches of images; ``expected`` has one per seed.

    fp32 kernels round differently across batch sizes and CPUs (~1e-6 on the tiny UNet,
    which can flip a uint8 pixel by one level), so pixels are not compared bit for bit.
    Each image must be within ``max_mean_abs`` levels on average of its counterpart AND
    closer to it than ``ratio`` times its distance to any other image: a wrong seed or
    prompt for an image, or a swap, fails.
    """
    a, b = _image_stack(expected), _image_stack(got)
    assert a.shape == b.shape, (a.shape, b.shape)
    dist = np.abs(a[:, None] - b[None, :]).reshape(len(a), len(b), -1).mean(-1)  # (expected, got)
    for i in range(len(a)):
        own = dist[i, i]
        others = np.delete(dist[:, i], i)
        assert own <= max_mean_abs, f"image {i}: {own:.3f} levels from its own seed's image"
        if len(others):
            closest = others.min()
            assert own < ratio * closest, f"image {i}: {own:.3f} levels, another image {closest:.3f}"


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


@contextmanager
def small_local_ray(num_gpus: int) -> Iterator[None]:
    """A local Ray with 2 CPUs and ``num_gpus`` fake GPUs (tasks get GPU ids, torch still
    sees the CPU)."""
    import ray

    ray.init(
        address="local",
        num_cpus=2,
        num_gpus=num_gpus,
        object_store_memory=200 * 2**20,
        include_dashboard=False,
        log_to_driver=False,
    )
    try:
        yield
    finally:
        ray.shutdown()
