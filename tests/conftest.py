"""Shared fixtures: the built-in tiny random pipeline, the real CLIP tokenizer, and a real
S3 server (SeaweedFS, see s3server.py)."""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

# One intra-op thread for torch in the tests and in every process they start (CLI runs, Ray
# workers; set before torch is imported). The tiny models gain little from a second thread, and
# on a 2-core CI machine shared with another job its spin-waiting doubles the CPU time: a tiny
# two-concept erase took 5.2 s of CPU (5.2 s wall) with one thread and 5.5 s (3.1 s wall) with
# two on an idle machine, but 4.6 s against 10.1 s (and no faster) beside another job.
# OMP_NUM_THREADS set by the caller wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from mace_core.clip_text import clip_tokenizer
from mace_core.concepts import ConceptType
from mace_core.families.sd1 import build_tiny_pipeline
from mace_core.families.stable_diffusion import TextEncoder

# tests/helpers.py is imported as `helpers` by the end-to-end tests.
sys.path.insert(0, str(Path(__file__).parent))
from helpers import SETTINGS  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def tokenizer():
    return clip_tokenizer()


@pytest.fixture(scope="session")
def tiny_pipe():
    """Shared tiny pipeline; tests must leave its weights as they found them."""
    return build_tiny_pipeline(seed=0)


@pytest.fixture(scope="session")
def tiny_sd2_pipe():
    """Shared tiny SD-2.x-shaped pipeline (v-prediction, '!' padding); leave its weights as
    found. Generating with it switches its scheduler to DPM-Solver (keeping v)."""
    from mace_core.families.sd2 import build_tiny_pipeline as build_tiny_sd2

    return build_tiny_sd2(seed=0)


@pytest.fixture(scope="session")
def encoder(tiny_pipe):
    return TextEncoder(tiny_pipe.tokenizer, tiny_pipe.text_encoder, torch.device("cpu"))


@pytest.fixture(scope="session")
def reference_erasure(tmp_path_factory):
    """The single-process result for tests/helpers.CONCEPTS: what every executor must match."""
    from helpers import CONCEPTS, erasure, request

    from mace_ray.erase.driver import run_erase

    tmp = tmp_path_factory.mktemp("reference")
    cfile = tmp / "concepts.txt"
    cfile.write_text(CONCEPTS)
    rep = run_erase(request(cfile, tmp / "out", executor="local", concepts_per_batch=2))
    return erasure(Path(rep["output"]["root"]))


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """A SeaweedFS S3 server on 127.0.0.1 with auth enforced, one per test module."""
    from s3server import S3Server

    server = S3Server(tmp_path_factory.mktemp("s3server"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def aws_env(s3_server, monkeypatch):
    """The server's credentials only: none of the caller's AWS or MACE_S3 settings."""
    for k in list(os.environ):
        if k.startswith(("AWS_", "MACE_S3_")):
            monkeypatch.delenv(k)
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    return s3_server


@pytest.fixture
def bucket(s3_server) -> str:
    return s3_server.create_bucket(f"t-{uuid.uuid4().hex[:12]}")


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray with 2 CPUs and 2 fake GPUs."""
    from helpers import small_local_ray

    with small_local_ray(num_gpus=2):
        yield


@pytest.fixture(scope="module")
def tiny_model_folder(tmp_path_factory, tiny_pipe) -> Path:
    """The tiny pipeline saved as a diffusers folder (safetensors); copy it before changing it."""
    folder = tmp_path_factory.mktemp("model") / "tiny"
    tiny_pipe.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def erased_run(tmp_path_factory) -> Path:
    """A tiny model with 'airplane' erased (the tests' cheap erase settings, in process)."""
    from mace_ray.erase.driver import run_erase
    from mace_ray.erase.request import EraseRequest

    tmp = tmp_path_factory.mktemp("erase")
    cfile = tmp / "concepts.txt"
    cfile.write_text("airplane | object | sky\n")
    rep = run_erase(
        EraseRequest(
            concept_file=str(cfile),
            model="tiny",
            output=str(tmp / "out"),
            default_type=ConceptType.OBJECT,
            settings=SETTINGS,
            executor="local",
        )
    )
    return Path(rep["output"]["root"])
