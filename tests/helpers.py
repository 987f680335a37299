"""Helpers shared by the end-to-end tests: small runs of the tiny model and their results."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mace_core.checkpoints import read_erasure
from mace_core.concepts import Concept, ConceptType
from mace_core.options import Group, cli_metadata
from mace_core.settings import DataSettings, EraseSettings, MaskSettings, TrainSettings

CONCEPTS = "Bill Clinton | celebrity\nVan Gogh | style\nairplane | object | sky\nAngelina Jolie | celebrity\n"


def tiny_settings(
    train_steps: int = 3, inference_steps: int = 3, prompts: int = 4, lr: float | None = None
) -> EraseSettings:
    """Erase settings small enough for the tiny models: 2 training images per concept,
    whole-image masks; ``lr`` None is the concept type's."""
    return EraseSettings(
        train=TrainSettings(steps=train_steps, lr=lr),
        data=DataSettings(images_per_concept=2, inference_steps=inference_steps),
        masks=MaskSettings(masker="whole-image"),
        prompts_per_concept=prompts,
    )


SETTINGS = tiny_settings()
# The same settings as command-line flags.
FLAGS = [
    "--model", "tiny", "--images", "2", "--inference-steps", "3", "--train-steps", "3",
    "--prompts-per-concept", "4", "--masker", "whole-image",
]  # fmt: skip
MACE_RAY = str(Path(sys.executable).parent / "mace-ray")


def request(concept_file: Path, output: Path, **kw):
    from mace_ray.erase.request import EraseRequest

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


def settings_fields(cls: type, path: str = "") -> Iterator[tuple[str, object]]:
    """(dotted path, command-line metadata) of every settings field under ``cls``, nested ones included."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = cli_metadata(f)
        yield f"{path}{f.name}", meta
        if isinstance(meta, Group):
            yield from settings_fields(hints[f.name], f"{path}{f.name}.")


class BackgroundErase(threading.Thread):
    """``run_erase(req)`` in a thread, so that a test can break something while it runs."""

    def __init__(self, req) -> None:
        super().__init__()
        self.req = req
        self.report: dict | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        from mace_ray.erase.driver import run_erase

        try:
            self.report = run_erase(self.req)
        except BaseException as e:  # surfaced by result()
            self.error = e

    @classmethod
    def until_a_concept_is_done(
        cls, req, out: Path, poll: float = 0.1, timeout: float = 300
    ) -> BackgroundErase:
        """Started, once a concept of the run written under ``out`` is DONE (or ``timeout`` s passed)."""
        run = cls(req)
        run.start()
        deadline = time.time() + timeout
        while time.time() < deadline and not list(out.glob("runs/*/concepts/*/DONE")):
            time.sleep(poll)
        return run

    def result(self, timeout: float = 600) -> dict | None:
        """The run's report, once it has ended without an error."""
        self.join(timeout=timeout)
        assert not self.is_alive()
        assert self.error is None, self.error
        return self.report


# ------------------------------------------------------------ a model family's tiny pipeline


def assert_text_statistics(enc, concept: Concept, d: int) -> None:
    """``concept``'s text statistics from ``enc`` over 4 prompts: d x d, the fusion's over all
    4 x 77 token states and the mapping's over a part of them, finite."""
    from mace_core.text_stats import concept_text_stats

    stats = concept_text_stats(enc, concept, n_prompts=4)
    assert stats.mapping.X.shape == stats.mapping.C.shape == stats.fusion.C.shape == (d, d)
    assert stats.fusion.n == 4 * 77 and 0 < stats.mapping.n < 4 * 77
    assert torch.isfinite(stats.mapping.X).all() and stats.mapping.C.trace() > 0


def train_and_attention_mass(pipe, family, concept: Concept, size: int) -> tuple[Any, dict[str, float]]:
    """Training images and 2 LoRA steps of a two-token ``concept`` on ``pipe``, then its attention
    mass with the original weights and with zero keys, all checked: 2 distinct ``size`` px
    images, a finite loss per step, a LoRA on every attn2 to_k / to_v, and zero keys giving
    uniform attention. Returns the concept's artefacts and the masses."""
    from mace_core.attn2 import get_attn2_weights
    from mace_core.concept_job import ConceptBatchWorker
    from mace_core.erasure_report import attention_mass

    cpu = torch.device("cpu")
    settings = tiny_settings(train_steps=2, inference_steps=2, prompts=3, lr=1e-2)
    original = get_attn2_weights(pipe.unet)
    assert list(original) == list(family.attn2_projections(pipe.unet))
    worker = ConceptBatchWorker(pipe, settings, cpu, original, original)
    (art,) = worker.finish(worker.data([concept]))
    assert art.images.shape == (2, size, size, 3) and art.images.dtype == np.uint8
    assert not np.array_equal(art.images[0], art.images[1])
    # One LoRA step per training step, on every attn2 to_k / to_v.
    assert len(art.losses) == 2 and all(np.isfinite(art.losses))
    assert set(art.lora.factors) == set(original)
    zero_keys = {k: torch.zeros_like(w) if ".to_k." in k else w for k, w in original.items()}
    mass = attention_mass(
        pipe.unet,
        pipe.vae,
        worker.noise_scheduler,
        worker.encoder,
        concept,
        art.images,
        art.masks,
        {"original": original, "zero keys": zero_keys},
        cpu,
    )
    assert all(0 < m < 1 for m in mass.values())
    # Zero keys: uniform attention over 77 tokens, 2 of them the concept's.
    assert mass["zero keys"] == pytest.approx(2 / 77, rel=1e-4)
    return art, mass


@torch.no_grad()
def evaluate_attention_loss(
    unet,
    vae,
    noise_scheduler,
    encoder: Any,  # mace_core.families.base.PromptEncoder
    job: Any,  # mace_core.train.TrainJob
    settings: Any,  # mace_core.settings.TrainSettings
    lora: Any,  # mace_core.lora.LoraFactors, or None: without a LoRA
    device: torch.device,
    n: int = 16,
) -> float:
    """Mean Eq. 3 loss over n fixed (image, prompt, t, noise) draws, with or without a LoRA:
    what LoRA training must lower (tests/test_train.py, tests/mmdit_checks.py)."""
    from mace_core.attention_loss import attention_loss
    from mace_core.families.base import conditioning_to
    from mace_core.lora import LoraBank
    from mace_core.noise import training_schedule
    from mace_core.train import concept_seed, draw, encode_latents, loss_token_mask

    projections = encoder.edited_projections(unet)
    shapes = {key: tuple(m.weight.shape) for key, m in projections.trained().items()}
    bank = LoraBank(shapes, 1, settings.rank, [torch.Generator().manual_seed(0)], device)
    if lora is not None:
        for key in lora.factors:
            A, B = lora.layer_factors(key)
            bank.A[bank.index[key]].data[0] = A.to(device)
            bank.B[bank.index[key]].data[0] = B.to(device)
    bank.slot = torch.zeros(1, dtype=torch.long, device=device)
    g = torch.Generator().manual_seed(concept_seed(settings.seed, job.concept, "eval"))
    lat = encode_latents(vae, job.images, device)
    cond = conditioning_to(encoder.conditioning(job.prompts), device)
    schedule = training_schedule(noise_scheduler).to(device)
    total = 0.0
    with encoder.attention_probes(unet, bank) as store:
        for _ in range(n):
            i, p, t, noise = draw(
                g, len(lat), len(job.prompts), lat.shape[1:], schedule.num_timesteps, True, settings
            )
            t = t.to(device)
            x = schedule.noised(lat[i][None], t, noise.to(device)[None])[0]
            store.clear()
            c = {key: v[p][None] for key, v in cond.items()}
            encoder.unet_forward(unet, x[None], schedule.model_time(t), c)
            tm = loss_token_mask(encoder, job.prompts[p], job.concept, settings.penalize_eot)[None].to(device)
            total += float(attention_loss(store, job.masks[i][None].to(device), tm, tuple(lat.shape[-2:]))[0])
    return total / n
