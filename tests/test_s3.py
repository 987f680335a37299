"""S3 storage against a real S3 server: SeaweedFS on 127.0.0.1 with auth enforced, no mocks.

Unit tests of S3Storage semantics, then `mace-ray erase --output s3://...` end to end:
equal to a local run, resume from the bucket, an S3 outage survived, an outage that outlasts
the retry budget (fails, then resumes), and one-line errors for bad S3 inputs.
"""

from __future__ import annotations

import filecmp
import json
import os
import pickle
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from s3server import (
    ADMIN_ACCESS_KEY,
    ADMIN_SECRET_KEY,
    READER_ACCESS_KEY,
    READER_SECRET_KEY,
    S3Server,
    free_ports,
)
from test_cli_erase import CONCEPTS, FAST
from typer.testing import CliRunner

import mace_ray.storage.s3 as s3mod
import mace_ray.storage.s3_folders as s3_folders
from mace_core.checkpoints import read_erasure
from mace_core.errors import ModelLoadError
from mace_ray.cli.main import app
from mace_ray.storage.base import StorageError, StorageUnavailableError
from mace_ray.storage.model_cache import TEXT_COMPONENTS
from mace_ray.storage.open_store import open_storage
from mace_ray.storage.resolve import Sources
from mace_ray.storage.s3 import S3Storage
from mace_ray.storage.s3_client import make_client
from mace_ray.storage.s3_folders import COMPLETE, PARTIAL

MB = 1024 * 1024
CREDENTIALS = (ADMIN_ACCESS_KEY, ADMIN_SECRET_KEY, READER_ACCESS_KEY, READER_SECRET_KEY)
MACE_RAY = str(Path(sys.executable).parent / "mace-ray")


def clean_env(server: S3Server) -> dict[str, str]:
    """This process's environment without the user's AWS/MACE_S3 settings, plus the server's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MACE_S3_"))}
    return {**env, **server.env(), "RAY_AUTH_MODE": "disabled"}


def raw_keys(server: S3Server, bucket: str, prefix: str = "") -> list[str]:
    """Every object physically in the bucket under ``prefix``, markers included."""
    pages = server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def make_folder(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        for cred in CREDENTIALS:
            assert cred not in text


# --- S3Storage semantics -----------------------------------------------------------------


def test_objects_write_read_exists_list_delete(aws_env, bucket):
    s = S3Storage(f"s3://{bucket}/root/", aws_env.endpoint)
    assert s.url == f"s3://{bucket}/root"
    s.write_bytes("runs/r1/manifest.json", b"{}")
    s.write_bytes("runs/r1/concepts/a/DONE", b"1")
    s.write_bytes("runs/r10/x", b"2")
    assert s.read_bytes("runs/r1/manifest.json") == b"{}"
    assert s.exists("runs/r1/manifest.json") and s.exists("runs/r1") and s.exists("runs")
    assert not s.exists("runs/r1/manifest") and not s.exists("runs/r2")
    assert s.list("runs/r1") == ["runs/r1/concepts/a/DONE", "runs/r1/manifest.json"]
    with pytest.raises(StorageError, match=f"s3://{bucket}/root/runs/nope does not exist"):
        s.read_bytes("runs/nope")
    for key in ("../x", "/abs", "a//b", "a/./b", ""):
        with pytest.raises(StorageError, match="invalid storage key"):
            s.write_bytes(key, b"")
    with pytest.raises(StorageError, match="reserved"):
        s.write_bytes(f"runs/{COMPLETE}", b"")

    s.page_size = 2  # listing in pages of two keys
    for i in range(5):
        s.write_bytes(f"many/{i}", b"")
    assert s.list("many") == [f"many/{i}" for i in range(5)]
    assert s.exists("many")

    s.delete_prefix("runs/r1")
    assert s.list("runs") == ["runs/r10/x"]  # the prefix ends at a path boundary
    assert raw_keys(aws_env, bucket, "root/runs/") == ["root/runs/r10/x"]


def test_put_dir_get_dir_multipart_and_replace(aws_env, bucket, tmp_path):
    big = os.urandom(12 * MB)
    v1 = make_folder(
        tmp_path / "v1",
        {"model_index.json": b"{}", "unet/w.safetensors": big, "unet/config.json": b"{1}", "vae/c": b"c"},
    )
    s = S3Storage(
        f"s3://{bucket}/p", aws_env.endpoint, multipart_threshold=5 * MB, multipart_chunksize=5 * MB
    )
    s.put_dir(v1, "final/pipeline")
    head = aws_env.client().head_object(Bucket=bucket, Key="p/final/pipeline/unet/w.safetensors")
    assert head["ETag"].endswith('-3"')  # a multipart upload of three parts
    assert s.exists("final/pipeline")
    assert s.list("final") == [
        "final/pipeline/model_index.json",
        "final/pipeline/unet/config.json",
        "final/pipeline/unet/w.safetensors",
        "final/pipeline/vae/c",
    ]
    assert f"p/final/pipeline/{COMPLETE}" in raw_keys(aws_env, bucket)
    assert f"p/final/pipeline/{PARTIAL}" not in raw_keys(aws_env, bucket)
    s.get_dir("final/pipeline", tmp_path / "got1")
    cmp = filecmp.dircmp(v1, tmp_path / "got1")
    assert not cmp.left_only and not cmp.right_only and not cmp.diff_files
    assert (tmp_path / "got1/unet/w.safetensors").read_bytes() == big

    # Replacing a folder leaves nothing of the older one.
    v2 = make_folder(tmp_path / "v2", {"model_index.json": b"{2}", "text_encoder/t": b"t"})
    s.put_dir(v2, "final/pipeline")
    assert raw_keys(aws_env, bucket, "p/final/") == [
        f"p/final/pipeline/{COMPLETE}",
        "p/final/pipeline/model_index.json",
        "p/final/pipeline/text_encoder/t",
    ]
    s.get_dir("final/pipeline", tmp_path / "got2")
    assert sorted(p.relative_to(tmp_path / "got2").as_posix() for p in (tmp_path / "got2").rglob("*")) == [
        "model_index.json",
        "text_encoder",
        "text_encoder/t",
    ]
    with pytest.raises(StorageError, match="does not exist"):
        s.get_dir("final/other", tmp_path / "got3")


class SimulatedCrash(BaseException):
    """A crash (kill, preemption): not an Exception, so no handler of ours catches it."""


def test_put_dir_crash_mid_upload_leaves_nothing_complete(aws_env, bucket, tmp_path, monkeypatch):
    files = {f"unet/part{i}.bin": os.urandom(1000 + i) for i in range(6)}
    v1 = make_folder(tmp_path / "v1", {"model_index.json": b"{1}", "old.bin": b"old"})
    v2 = make_folder(tmp_path / "v2", {"model_index.json": b"{2}", **files})
    s = S3Storage(f"s3://{bucket}/p", aws_env.endpoint)
    s.put_dir(v1, "final/pipeline")
    assert s.exists("final/pipeline")

    # Crash after the first file of the replacement is uploaded.
    real = s3_folders.create_transfer_manager

    def crashing_manager(client, config):
        tm = real(client, config)
        calls = {"n": 0}
        upload = tm.upload

        def upload_then_crash(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 2:
                raise SimulatedCrash()
            fut = upload(*args, **kwargs)
            fut.result()  # the first file is really in the bucket
            return fut

        tm.upload = upload_then_crash
        return tm

    with monkeypatch.context() as m, pytest.raises(SimulatedCrash):
        m.setattr(s3_folders, "create_transfer_manager", crashing_manager)
        s.put_dir(v2, "final/pipeline")

    keys = raw_keys(aws_env, bucket, "p/final/pipeline/")
    assert f"p/final/pipeline/{PARTIAL}" in keys and f"p/final/pipeline/{COMPLETE}" not in keys
    assert len(keys) == 2  # the marker and the one uploaded file; the old copy is gone
    for view in (s, S3Storage(f"s3://{bucket}/p", aws_env.endpoint)):  # also a fresh process's view
        assert not view.exists("final/pipeline")
        assert view.list("final") == []
        with pytest.raises(StorageError, match="incomplete"):
            view.get_dir("final/pipeline", tmp_path / "got")

    # Crash at the commit: every file is there, and still nothing looks complete.
    put = s.put_object

    def crash_at_commit(full: str, data: bytes) -> None:
        if full.endswith(COMPLETE):
            raise SimulatedCrash()
        put(full, data)

    with monkeypatch.context() as m, pytest.raises(SimulatedCrash):
        m.setattr(s, "put_object", crash_at_commit)
        s.put_dir(v2, "final/pipeline")
    assert len(raw_keys(aws_env, bucket, "p/final/pipeline/")) == len(files) + 2
    assert not s.exists("final/pipeline") and s.list("final") == []

    # Writing it again completes it, with no leftovers.
    s.put_dir(v2, "final/pipeline")
    assert s.exists("final/pipeline")
    assert raw_keys(aws_env, bucket, "p/final/pipeline/") == sorted(
        [f"p/final/pipeline/{COMPLETE}", "p/final/pipeline/model_index.json"]
        + [f"p/final/pipeline/{rel}" for rel in files]
    )
    s.get_dir("final/pipeline", tmp_path / "got")
    assert not filecmp.dircmp(v2, tmp_path / "got").diff_files

    # A committed folder whose file was later removed is reported, not half-downloaded.
    aws_env.client().delete_object(Bucket=bucket, Key="p/final/pipeline/unet/part0.bin")
    with pytest.raises(StorageError, match="unet/part0.bin is missing"):
        s.get_dir("final/pipeline", tmp_path / "got4")
    s.delete_prefix("final")
    assert raw_keys(aws_env, bucket, "p/") == []


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("s3://", "has no bucket"),
        ("s3:///x", "has no bucket"),
        ("s3://Bad_Bucket!/x", "'Bad_Bucket!' is not a valid bucket name"),
        ("s3://ab/x", "'ab' is not a valid bucket name"),
        ("s3://bucket/a/../b", "invalid prefix"),
    ],
)
def test_malformed_urls(aws_env, url, needle):
    with pytest.raises(StorageError, match=needle) as e:
        open_storage(url, s3_endpoint=aws_env.endpoint)
    assert repr(url) in str(e.value)


def test_credentials_in_the_url_are_refused_unechoed(aws_env):
    with pytest.raises(StorageError, match="'s3://runs-b/x' with credentials") as e:
        open_storage("s3://AKIAX:secret-0123@runs-b/x", s3_endpoint=aws_env.endpoint)
    assert "secret-0123" not in str(e.value) and "\n" not in str(e.value)


def test_auth_errors_and_missing_bucket_fail_at_once_without_secrets(aws_env, bucket, monkeypatch):
    url = f"s3://{bucket}/runs"
    cases = [
        ({"AWS_SECRET_ACCESS_KEY": "wrong-secret-0123"}, "SignatureDoesNotMatch"),
        ({"AWS_ACCESS_KEY_ID": "NOSUCHACCESSKEY0"}, "InvalidAccessKeyId"),
    ]
    for env, code in cases:
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.setenv(k, v)
            t = time.monotonic()
            with pytest.raises(StorageError) as e:
                open_storage(url, s3_endpoint=aws_env.endpoint)
            assert time.monotonic() - t < 5  # not retried
            msg = str(e.value)
            assert code in msg and repr(bucket) in msg and url in msg and "\n" not in msg
            assert_no_secret(msg)
            assert "wrong-secret-0123" not in msg and "NOSUCHACCESSKEY0" not in msg

    with pytest.raises(StorageError, match="bucket 'no-such-bucket-0' does not exist"):
        open_storage("s3://no-such-bucket-0/x", s3_endpoint=aws_env.endpoint)

    with monkeypatch.context() as m:
        m.delenv("AWS_ACCESS_KEY_ID")
        m.delenv("AWS_SECRET_ACCESS_KEY")
        with pytest.raises(StorageError, match="no usable S3 credentials"):
            open_storage(url, s3_endpoint=aws_env.endpoint)

    # A read-only identity opens the bucket; its first write is refused, once.
    with monkeypatch.context() as m:
        m.setenv("AWS_ACCESS_KEY_ID", READER_ACCESS_KEY)
        m.setenv("AWS_SECRET_ACCESS_KEY", READER_SECRET_KEY)
        s = open_storage(url, s3_endpoint=aws_env.endpoint)
        with pytest.raises(StorageError, match=r"AccessDenied") as e:
            s.write_bytes("runs/x/manifest.json", b"{}")
        assert f"{url}/runs/x/manifest.json" in str(e.value)
        assert_no_secret(str(e.value))


def test_unreachable_endpoint_gives_up_after_the_budget(aws_env, bucket, monkeypatch):
    (port,) = free_ports(1)  # nothing listens there
    monkeypatch.setenv("MACE_S3_RETRY_SECONDS", "1")
    t = time.monotonic()
    with pytest.raises(StorageUnavailableError, match=f"S3 at http://127.0.0.1:{port} unavailable") as e:
        open_storage(f"s3://{bucket}/x", s3_endpoint=f"http://127.0.0.1:{port}")
    assert time.monotonic() - t < 15
    assert "resume" in str(e.value) and not isinstance(e.value, StorageError)  # CLI: exit 1
    with pytest.raises(StorageError, match="not a valid URL"):
        open_storage(f"s3://{bucket}/x", s3_endpoint=f"127.0.0.1:{port}")
    # Another scheme is input too (botocore would fail only at the first request, as a bug).
    with pytest.raises(StorageError, match=f"'ftp://127.0.0.1:{port}' is not a valid URL") as e:
        open_storage(f"s3://{bucket}/x", s3_endpoint=f"ftp://user:pw-0123@127.0.0.1:{port}")
    assert "pw-0123" not in str(e.value)
    monkeypatch.setenv("MACE_S3_RETRY_SECONDS", "soon")
    with pytest.raises(StorageError, match="MACE_S3_RETRY_SECONDS"):
        open_storage(f"s3://{bucket}/x", s3_endpoint=aws_env.endpoint)


def test_addressing_style_and_endpoint_from_the_environment(aws_env, bucket, monkeypatch):
    style = lambda c: c.meta.config.s3["addressing_style"]  # noqa: E731
    assert style(make_client("u", aws_env.endpoint, None, 4)) == "path"  # not AWS: path-style
    assert style(make_client("u", "https://s3.eu-west-1.amazonaws.com", None, 4)) == "auto"
    monkeypatch.setenv("MACE_S3_ADDRESSING_STYLE", "virtual")  # the override wins
    assert s3mod.addressing_style() == "virtual"
    monkeypatch.setenv("MACE_S3_ADDRESSING_STYLE", "sideways")
    with pytest.raises(StorageError, match="MACE_S3_ADDRESSING_STYLE='sideways'"):
        open_storage(f"s3://{bucket}/x", s3_endpoint=aws_env.endpoint)
    monkeypatch.delenv("MACE_S3_ADDRESSING_STYLE")
    # AWS_ENDPOINT_URL alone is enough, and is served path-style.
    monkeypatch.setenv("AWS_ENDPOINT_URL", aws_env.endpoint)
    s = open_storage(f"s3://{bucket}/x")
    assert style(s.client) == "path" and s.endpoint == aws_env.endpoint
    s.write_bytes("k", b"v")
    assert s.read_bytes("k") == b"v"


def test_pickled_storage_carries_no_credentials(aws_env, bucket):
    s = S3Storage(f"s3://{bucket}/x", aws_env.endpoint)
    s.write_bytes("a", b"1")
    data = pickle.dumps(s)  # how Ray ships it to a worker
    assert all(cred.encode() not in data for cred in CREDENTIALS)
    t = pickle.loads(data)
    assert t.read_bytes("a") == b"1" and t.url == s.url and t.endpoint == s.endpoint


def test_sources_download_and_cache_an_s3_pipeline(aws_env, bucket, tmp_path, tiny_pipe):
    from mace_core.models import load_pipeline, load_text_components

    tiny_pipe.save_pretrained(tmp_path / "tiny", safe_serialization=True)
    models = S3Storage(f"s3://{bucket}/models", aws_env.endpoint)
    models.put_dir(tmp_path / "tiny", "tiny-sd")
    uri, cache = f"s3://{bucket}/models/tiny-sd", tmp_path / "cache"

    def resolve_model(model: str, endpoint: str, cache_dir: Path, components=None) -> str:
        return Sources(endpoint, cache_dir=cache_dir).pipeline(model, components)

    assert resolve_model("tiny", aws_env.endpoint, cache_dir=cache) == "tiny"
    path = resolve_model(uri, aws_env.endpoint, cache_dir=cache)
    pipe = load_pipeline(path)
    a, b = tiny_pipe.unet.state_dict(), pipe.unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resolve_model(uri, aws_env.endpoint, cache_dir=cache) == path  # cached
    assert [p.name for p in cache.iterdir()] == [Path(path).name]  # no temporaries left

    # The driver fetches only what it needs to check prompts: no UNet, no VAE.
    text_only = resolve_model(uri, aws_env.endpoint, cache_dir=cache, components=TEXT_COMPONENTS)
    got = sorted(p.name for p in Path(text_only).iterdir())
    assert got == ["model_index.json", "text_encoder", "tokenizer"]
    tok, te = load_text_components(text_only)
    assert all(torch.equal(v, tiny_pipe.text_encoder.state_dict()[k]) for k, v in te.state_dict().items())
    assert tok("a photo of a cat").input_ids == tiny_pipe.tokenizer("a photo of a cat").input_ids
    with pytest.raises(ModelLoadError, match="no unet2/ in the pipeline folder"):
        resolve_model(uri, aws_env.endpoint, cache_dir=cache, components=["unet2"])

    # The same URI with changed contents is a new copy.
    cfg_path = tmp_path / "tiny/scheduler/scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "steps_offset": 1 - cfg.get("steps_offset", 0)}))
    models.put_dir(tmp_path / "tiny", "tiny-sd")
    changed = resolve_model(uri, aws_env.endpoint, cache_dir=cache)
    assert changed not in (path, text_only)
    assert json.loads((Path(changed) / "scheduler/scheduler_config.json").read_text()) != cfg
    # A committed folder altered behind its marker's back is refused, not half-trusted.
    models.write_bytes("tiny-sd/model_index.json", b"{}")
    with pytest.raises(StorageError, match="model_index.json is missing or has the wrong size"):
        resolve_model(uri, aws_env.endpoint, cache_dir=cache)

    with pytest.raises(ModelLoadError, match="no such folder"):
        resolve_model(f"s3://{bucket}/models/none", aws_env.endpoint, cache_dir=cache)
    # An upload that was cut off (its in-progress marker, no commit) is no folder either.
    models.client.put_object(Bucket=bucket, Key="models/half/.mace-partial", Body=b"")
    models.write_bytes("half/model_index.json", b"{}")
    with pytest.raises(ModelLoadError, match=r"no such folder \(or its upload did not complete\)"):
        resolve_model(f"s3://{bucket}/models/half", aws_env.endpoint, cache_dir=cache)
    models.write_bytes("plain/unet/config.json", b"{}")  # a folder of objects, no model_index.json
    with pytest.raises(ModelLoadError, match="not a diffusers pipeline folder"):
        resolve_model(f"s3://{bucket}/models/plain", aws_env.endpoint, cache_dir=cache)


# --- mace-ray erase --output s3://... ------------------------------------------------------


def start_cli(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [MACE_RAY, "erase", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@contextmanager
def running_cli(args: list[str], env: dict[str, str]) -> Iterator[subprocess.Popen]:
    """A CLI run in the background, killed if the test ends before it does."""
    proc = start_cli(args, env)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def run_cli(args: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [MACE_RAY, "erase", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def wait_for_manifest(server: S3Server, bucket: str, prefix: str, proc: subprocess.Popen) -> None:
    """Return as soon as the run has opened its run folder (its first write)."""
    client = server.client()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        page = client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/runs/")
        if any(o["Key"].endswith("/manifest.json") for o in page.get("Contents", [])):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("the run never wrote its manifest")


def erasure_at(storage: S3Storage, run_id: str) -> dict[str, torch.Tensor]:
    return read_erasure(storage.read_bytes(f"runs/{run_id}/final/erasure.safetensors"))[0]


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    """Equal tensors; a resumed run trains its remaining concepts in smaller batches, which
    changes float rounding, so it is compared with a tolerance."""
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=0), (k, (a[k] - b[k]).abs().max())


def assert_nothing_half_done(server: S3Server, bucket: str, prefix: str) -> int:
    """Every DONE marker has its LoRA, notes, images and masks (the shared data its run's
    refs.json names); a committed final folder has every file it lists. Returns the number
    of DONE markers."""
    keys = set(raw_keys(server, bucket, prefix + "/"))
    client = server.client()

    def read(key: str) -> dict:
        return json.loads(client.get_object(Bucket=bucket, Key=key)["Body"].read())

    done = [k for k in keys if k.endswith("/DONE")]
    for k in done:
        base = k[: -len("DONE")]
        run_root, _, slug = base.rstrip("/").rpartition("/concepts/")
        data = f"{prefix}/data/{read(run_root + '/refs.json')['data'][slug]}/"
        n = read(k)["images"]
        need = {base + "lora.safetensors", base + "notes.json", data + "data.json"}
        need |= {f"{data}{kind}/{i:03d}.png" for kind in ("images", "masks") for i in range(n)}
        assert need <= keys, (k, need - keys)
    for k in keys:
        if k.endswith("/final/pipeline/" + COMPLETE):
            folder = k[: -len(COMPLETE)]
            listed = json.loads(client.get_object(Bucket=bucket, Key=k)["Body"].read())["files"]
            assert {folder + rel for rel in listed} <= keys
    return len(done)


def all_text_objects(server: S3Server, bucket: str, prefix: str) -> str:
    client = server.client()
    return "\n".join(
        client.get_object(Bucket=bucket, Key=k)["Body"].read().decode()
        for k in raw_keys(server, bucket, prefix + "/")
        if k.endswith((".json", "/DONE"))
    )


@pytest.fixture(scope="module")
def erased(s3_server, tmp_path_factory):
    """One local run and the same run to s3://<bucket>/full."""
    tmp = tmp_path_factory.mktemp("s3erase")
    cfile = tmp / "concepts.txt"
    cfile.write_text(CONCEPTS)
    env = clean_env(s3_server)
    bucket = s3_server.create_bucket(f"runs-{uuid.uuid4().hex[:12]}")
    args = [str(cfile), "--model", "tiny", "--output", f"s3://{bucket}/full", *FAST]
    # Both at once: two cores, and each run is mostly single-threaded start-up.
    local = start_cli([str(cfile), "--model", "tiny", "--output", str(tmp / "local"), *FAST], env)
    remote = start_cli([*args, "--s3-endpoint", s3_server.endpoint], env)
    try:
        out, err = remote.communicate(timeout=600)
        local_out, local_err = local.communicate(timeout=600)
    finally:
        for proc in (local, remote):
            if proc.poll() is None:
                proc.kill()
    assert remote.returncode == 0, err
    assert local.returncode == 0, local_err
    local_root = Path(json.loads(local_out.strip().splitlines()[-1])["root"])
    return {
        "cfile": cfile,
        "env": env,
        "bucket": bucket,
        "result": json.loads(out.strip().splitlines()[-1]),
        "stdout": out,
        "stderr": err,
        "local_root": local_root,
        "reference": read_erasure((local_root / "final/erasure.safetensors").read_bytes())[0],
    }


def test_erase_to_s3_equals_a_local_run(erased, s3_server, aws_env, tmp_path):
    from diffusers import StableDiffusionPipeline

    bucket, result = erased["bucket"], erased["result"]
    run_id = result["run_id"]
    assert result["status"] == "complete" and result["root"] == f"s3://{bucket}/full/runs/{run_id}"
    s = S3Storage(f"s3://{bucket}/full", s3_server.endpoint)
    s.get_dir(f"runs/{run_id}/final/pipeline", tmp_path / "pipeline")
    got = StableDiffusionPipeline.from_pretrained(tmp_path / "pipeline", local_files_only=True)
    ref = StableDiffusionPipeline.from_pretrained(
        erased["local_root"] / "final/pipeline", local_files_only=True
    )
    for name in ("unet", "text_encoder", "vae"):
        a, b = getattr(got, name).state_dict(), getattr(ref, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert_same(erasure_at(s, run_id), erased["reference"])

    root = f"runs/{run_id}"
    assert json.loads(s.read_bytes(f"{root}/manifest.json"))["status"] == "complete"
    report = json.loads(s.read_bytes(f"{root}/report.json"))
    assert report["status"] == "complete" and len(report["concepts"]) == 3
    assert assert_nothing_half_done(s3_server, bucket, "full") == 3

    # Credentials appear nowhere: not in the job log, the result, or any stored JSON.
    assert_no_secret(erased["stderr"], erased["stdout"], all_text_objects(s3_server, bucket, "full"))


def test_resume_from_s3_recomputes_only_the_unfinished_concept(erased, s3_server, aws_env):
    bucket, run_id = erased["bucket"], erased["result"]["run_id"]
    client = s3_server.client()
    for key in raw_keys(s3_server, bucket, "full/"):  # a copy of the finished run
        client.copy_object(Bucket=bucket, Key="resume/" + key[5:], CopySource={"Bucket": bucket, "Key": key})
    s = S3Storage(f"s3://{bucket}/resume", s3_server.endpoint)
    root = f"runs/{run_id}"
    # As a crash after two concepts would leave it: no final model, one concept not done.
    s.delete_prefix(f"{root}/final")
    s.delete_prefix(f"{root}/report.json")
    manifest = json.loads(s.read_bytes(f"{root}/manifest.json"))
    s.write_bytes(f"{root}/manifest.json", json.dumps({**manifest, "status": "running"}).encode())
    slugs = sorted({k.split("/")[3] for k in s.list(f"{root}/concepts")})
    redo = slugs[0]
    s.delete_prefix(f"{root}/concepts/{redo}/DONE")

    def lora_stamps() -> dict[str, tuple[str, object]]:
        out = {}
        for slug in slugs:
            h = client.head_object(Bucket=bucket, Key=f"resume/{root}/concepts/{slug}/lora.safetensors")
            out[slug] = (h["ETag"], h["LastModified"])
        return out

    before = lora_stamps()
    time.sleep(1.1)  # LastModified has one-second resolution
    args = [str(erased["cfile"]), "--model", "tiny", "--output", f"s3://{bucket}/resume", *FAST]
    proc = run_cli([*args, "--s3-endpoint", s3_server.endpoint], erased["env"])
    assert proc.returncode == 0, proc.stderr
    assert "2 concepts done before, 1 to do" in proc.stderr
    after = lora_stamps()
    assert [slug for slug in slugs if after[slug] != before[slug]] == [redo]
    assert_same(erasure_at(s, run_id), erased["reference"], atol=1e-6)
    assert json.loads(s.read_bytes(f"{root}/report.json"))["resumed"] == 1


def test_s3_outage_during_a_run_is_retried(erased, s3_server, aws_env):
    bucket = erased["bucket"]
    args = [str(erased["cfile"]), "--model", "tiny", "--output", f"s3://{bucket}/outage", *FAST]
    with running_cli([*args, "--s3-endpoint", s3_server.endpoint], erased["env"]) as proc:
        try:
            wait_for_manifest(s3_server, bucket, "outage", proc)
            s3_server.kill()
            time.sleep(4)
        finally:
            s3_server.ensure_running()
        out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert "S3 unreachable" in err and "retrying in" in err  # it did hit the outage
    run_id = json.loads(out.strip().splitlines()[-1])["run_id"]
    s = S3Storage(f"s3://{bucket}/outage", s3_server.endpoint)
    assert_same(erasure_at(s, run_id), erased["reference"])
    assert assert_nothing_half_done(s3_server, bucket, "outage") == 3
    assert_no_secret(out, err)


def test_s3_outage_beyond_the_retry_budget_fails_then_resumes(erased, s3_server, aws_env):
    bucket = erased["bucket"]
    args = [str(erased["cfile"]), "--model", "tiny", "--output", f"s3://{bucket}/down", *FAST]
    args += ["--s3-endpoint", s3_server.endpoint]
    with running_cli(args, {**erased["env"], "MACE_S3_RETRY_SECONDS": "2"}) as proc:
        try:
            wait_for_manifest(s3_server, bucket, "down", proc)
            s3_server.kill()
            out, err = proc.communicate(timeout=300)  # the server stays down until the run gives up
        finally:
            s3_server.ensure_running()
    # An infrastructure failure (exit 1, not "bad input"), with a message that says what to do.
    assert proc.returncode == 1, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"mace-ray: s3://{bucket}/down/") and "bug" not in last, last
    assert "StorageUnavailableError" in err  # with its traceback, as every exit 1
    assert f"S3 at {s3_server.endpoint} unavailable" in last and "rerun the same command to resume" in last
    assert_no_secret(out, err)
    n_done = assert_nothing_half_done(s3_server, bucket, "down")
    s = S3Storage(f"s3://{bucket}/down", s3_server.endpoint)
    runs = {k.split("/")[1] for k in s.list("runs")}
    assert len(runs) == 1
    run_id = runs.pop()
    assert not s.exists(f"runs/{run_id}/final/pipeline") and not s.exists(f"runs/{run_id}/report.json")

    again = run_cli(args, erased["env"])
    assert again.returncode == 0, again.stderr
    assert f"{n_done} concepts done before, {3 - n_done} to do" in again.stderr
    assert_same(erasure_at(s, run_id), erased["reference"], atol=1e-6)
    assert assert_nothing_half_done(s3_server, bucket, "down") == 3
    assert json.loads(s.read_bytes(f"runs/{run_id}/manifest.json"))["status"] == "complete"


@pytest.mark.parametrize(
    ("output", "env", "needles"),
    [
        (
            "s3://{bucket}/x",
            {"AWS_SECRET_ACCESS_KEY": "wrong-secret-0123"},
            ["SignatureDoesNotMatch", "{bucket}"],
        ),
        ("s3://{bucket}/x", {"AWS_ACCESS_KEY_ID": "NOSUCHACCESSKEY0"}, ["InvalidAccessKeyId", "{bucket}"]),
        ("s3://no-such-bucket-1/x", {}, ["bucket 'no-such-bucket-1' does not exist"]),
        ("s3://Bad_Bucket!/x", {}, ["'s3://Bad_Bucket!/x'", "not a valid bucket name"]),
        ("s3:///x", {}, ["'s3:///x'", "has no bucket"]),
        ("s3://", {}, ["'s3://'", "has no bucket"]),
        ("s3:/{bucket}/x", {}, ["'s3:/{bucket}/x'", "mistyped S3 URL"]),
    ],
)
def test_bad_s3_output_is_a_one_line_error(s3_server, bucket, tmp_path, monkeypatch, output, env, needles):
    monkeypatch.chdir(tmp_path)  # a mistyped URL taken as a folder would land here
    cfile = tmp_path / "c.txt"
    cfile.write_text("dog\n")
    output = output.format(bucket=bucket)
    # CliRunner only sets variables: unset the caller's AWS settings explicitly.
    unset = {k: None for k in os.environ if k.startswith(("AWS_", "MACE_S3_"))}
    full_env = {**unset, **s3_server.env(), **env}
    args = ["erase", str(cfile), "--model", "tiny", "--output", output, "--s3-endpoint", s3_server.endpoint]
    r = CliRunner().invoke(app, [*args, *FAST], env=full_env)
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("mace-ray: error:"), r.stderr
    for needle in needles:
        assert needle.format(bucket=bucket) in lines[0]
    assert_no_secret(r.stderr, r.stdout)
    assert "wrong-secret-0123" not in r.stderr and "NOSUCHACCESSKEY0" not in r.stderr
    assert raw_keys(s3_server, bucket) == []  # nothing written
    assert not (tmp_path / "s3:").exists()
