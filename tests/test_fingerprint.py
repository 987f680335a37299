"""Model fingerprints and sealed artefacts: what keys a run, and what a reader can trust."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import mace_core.fingerprint as fp
from mace_core.errors import ArtefactError, ModelLoadError
from mace_core.fingerprint import ModelChangedError, expect_fingerprint, folder_fingerprint, is_fingerprinted
from mace_core.sealed import open_sealed, sealed_bytes
from mace_core.source_folder import model_fingerprint

UNET = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture
def model(tiny_model_folder, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_folder, copy)
    return copy


def flip_last_byte(path) -> None:
    """Change one byte in place, keeping the size and the mtime (a silent corruption)."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        b = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([b[0] ^ 1]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_which_files_count():
    assert is_fingerprinted("model_index.json")
    assert is_fingerprinted(UNET) and is_fingerprinted("unet/config.json")
    assert is_fingerprinted("tokenizer/vocab.json") and is_fingerprinted("scheduler/scheduler_config.json")
    assert is_fingerprinted("unet/diffusion_pytorch_model-00001-of-00002.safetensors")
    # never read by a run: other weight formats, variants, components it does not load
    assert not is_fingerprinted("unet/diffusion_pytorch_model.bin")
    assert not is_fingerprinted("unet/diffusion_pytorch_model.fp16.safetensors")
    assert not is_fingerprinted("safety_checker/model.safetensors")
    assert not is_fingerprinted("README.md") and not is_fingerprinted("unet/.cache/x")
    # the shard indexes of those: a variant's, a pickled checkpoint's
    assert is_fingerprinted("unet/diffusion_pytorch_model.safetensors.index.json")
    assert not is_fingerprinted("unet/diffusion_pytorch_model.safetensors.index.fp16.json")
    assert not is_fingerprinted("unet/diffusion_pytorch_model.bin.index.json")


def test_what_counts_is_what_a_hub_download_fetches():
    """One rule (mace_core/weight_files.py): a file the fingerprint counts is one the hub
    download of a run's components fetches, and the other way round."""
    from huggingface_hub.utils import filter_repo_objects

    from mace_core.weight_files import NOT_LOADED

    names = ["config.json", "model.safetensors", "model-00001-of-00002.safetensors", "model.fp16.safetensors"]
    names += ["model.safetensors.index.json", "model.safetensors.index.fp16.json", "model.bin"]
    names += ["model.bin.index.json", "model.ema.safetensors", "flax_model.msgpack", "vocab.json"]
    files = ["model_index.json", *(f"{c}/{n}" for c in (*fp.COMPONENTS, "safety_checker") for n in names)]
    allow = ["model_index.json", *(f"{c}/*" for c in fp.COMPONENTS)]
    fetched = set(filter_repo_objects(files, allow_patterns=allow, ignore_patterns=NOT_LOADED))
    assert {f for f in files if is_fingerprinted(f)} == fetched
    assert len(fetched) == 1 + 5 * len(fp.COMPONENTS)


def test_a_hub_models_fingerprint_ignores_what_else_its_cached_snapshot_holds(model, tmp_path, monkeypatch):
    """Offline, a hub id is fingerprinted from its cached snapshot: files another download
    put there (a variant's index, pickled weights, the safety checker) change nothing, and
    the fingerprint is the same folder's held locally."""
    import huggingface_hub.constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub/models--someone--tiny-sd"
    shutil.copytree(model, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs/main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    before = model_fingerprint("someone/tiny-sd", tmp_path / "digests")
    assert before == folder_fingerprint(model, tmp_path / "digests")
    snapshot = repo / "snapshots" / commit
    shutil.copy(snapshot / UNET, snapshot / "unet/diffusion_pytorch_model.fp16.safetensors")
    (snapshot / "unet/diffusion_pytorch_model.safetensors.index.fp16.json").write_text("{}")
    (snapshot / "unet/diffusion_pytorch_model.bin.index.json").write_text("{}")
    (snapshot / "safety_checker").mkdir()
    (snapshot / "safety_checker/model.safetensors").write_bytes(b"x")
    assert model_fingerprint("someone/tiny-sd", tmp_path / "digests") == before


def test_any_change_to_a_component_changes_its_fingerprint(model, tmp_path):
    cache = tmp_path / "digests"
    before = folder_fingerprint(model, cache)
    assert set(before.components) == {"model_index", "unet", "vae", "text_encoder", "tokenizer", "scheduler"}

    flip_last_byte(model / UNET)  # same size, same mtime: the ctime still tells
    after = folder_fingerprint(model, cache)
    assert before.changed(after) == ["unet"]
    assert after.full != before.full
    assert after.text == before.text  # the prior statistics are still shared

    cfg = model / "vae/config.json"
    cfg.write_text(cfg.read_text().replace('"latent_channels": 4', '"latent_channels": 4 '))
    assert folder_fingerprint(model, cache).changed(after) == ["vae"]

    (model / "unet/diffusion_pytorch_model.bin").write_bytes(b"never loaded")
    (model / "README.md").write_text("notes")
    assert folder_fingerprint(model, cache).changed(after) == ["vae"]


def test_digests_are_cached_so_a_large_model_is_read_once(model, tmp_path, monkeypatch):
    cache = tmp_path / "digests"
    first = folder_fingerprint(model, cache)
    reads = []
    real = fp.file_sha256
    monkeypatch.setattr(fp, "file_sha256", lambda p: reads.append(p) or real(p))
    assert folder_fingerprint(model, cache) == first
    assert reads == []  # stat only
    flip_last_byte(model / UNET)
    folder_fingerprint(model, cache)
    assert [p.name for p in reads] == ["diffusion_pytorch_model.safetensors"]  # only what changed
    # An unwritable cache only costs reading again.
    assert folder_fingerprint(model, tmp_path / "a-file-not-a-folder" / "x") != first


def test_fingerprints_refuse_what_is_not_a_pipeline(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no model_index.json"):
        folder_fingerprint(tmp_path / "empty")
    (tmp_path / "half").mkdir()
    (tmp_path / "half/model_index.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="no unet/"):
        folder_fingerprint(tmp_path / "half")


def test_tiny_fingerprint_is_the_same_in_every_process():
    code = "from mace_core.fingerprint import tiny_fingerprint as t; print(t().full)"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # set order differs from this process's
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert other.stdout.strip() == fp.tiny_fingerprint().full


def test_expect_fingerprint_names_the_model_in_one_line(model, tmp_path):
    now = folder_fingerprint(model, tmp_path / "d")
    expect_fingerprint(str(model), now.full, now)
    with pytest.raises(ModelChangedError) as e:
        expect_fingerprint(str(model), "0123456789abcdef", now)
    assert "\n" not in str(e.value) and str(model) in str(e.value) and now.full in str(e.value)


def test_sealed_files_detect_truncation_and_alteration(tmp_path):
    t = {"C": torch.randn(8, 8, dtype=torch.float64), "n": torch.tensor(3)}
    data = sealed_bytes(t, {"captions": "5"})
    back, meta = open_sealed(data, "x")
    assert torch.equal(back["C"], t["C"]) and meta["captions"] == "5"
    with pytest.raises(ArtefactError, match="x is not a readable safetensors file"):
        open_sealed(data[: len(data) // 2], "x")
    altered = bytearray(data)
    altered[-3] ^= 1
    with pytest.raises(ArtefactError, match="does not match its checksum"):
        open_sealed(bytes(altered), "x")
    path = tmp_path / "plain.safetensors"
    save_file(t, path)  # no seal: refused where one is required, read where it is not
    with pytest.raises(ArtefactError, match="carries no checksum"):
        open_sealed(path.read_bytes(), "x")
    assert torch.equal(open_sealed(path.read_bytes(), "x", required=False)[0]["C"], t["C"])
    # A sealed file is still a plain safetensors file for every other reader.
    (tmp_path / "s.safetensors").write_bytes(data)
    assert torch.equal(load_file(tmp_path / "s.safetensors")["C"], t["C"])


def test_a_hub_models_fingerprint_comes_from_the_hubs_metadata_without_its_weights(
    model, tmp_path, monkeypatch
):
    """Online, the weights' SHA-256 come from the hub's LFS metadata and only the small files
    are fetched: the driver of a run never downloads the UNet to fingerprint it, and the
    fingerprint is the one a local copy of the folder has."""
    import hashlib
    import types

    import huggingface_hub
    from huggingface_hub.hf_api import BlobLfsInfo, RepoSibling

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    (model / "unet/diffusion_pytorch_model.fp16.safetensors").write_bytes(b"a variant, never counted")
    (model / "safety_checker").mkdir()
    (model / "safety_checker/model.safetensors").write_bytes(b"not a component a run loads")
    siblings = []
    for p in sorted(model.rglob("*")):
        if p.is_file():
            rel = p.relative_to(model).as_posix()
            data = p.read_bytes()
            lfs = (
                BlobLfsInfo(len(data), hashlib.sha256(data).hexdigest(), 134)
                if rel.endswith(".safetensors")
                else None
            )
            siblings.append(RepoSibling(rel, len(data), "0" * 40, lfs))
    commit = "0123456789abcdef0123456789abcdef01234567"
    fetched = []

    def model_info(self, repo_id, *, files_metadata=False, **_):
        assert repo_id == "someone/tiny-sd" and files_metadata
        return types.SimpleNamespace(sha=commit, siblings=siblings)

    def hf_hub_download(repo_id, filename, *, revision=None, **_):
        assert revision == commit  # model_index.json too: one commit's files, not the latest's
        fetched.append(filename)
        return str(model / filename)

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    got = model_fingerprint("someone/tiny-sd", tmp_path / "digests")
    (model / "unet/diffusion_pytorch_model.fp16.safetensors").unlink()
    shutil.rmtree(model / "safety_checker")
    assert got == folder_fingerprint(model, tmp_path / "digests")
    assert fetched and not any(f.endswith(".safetensors") for f in fetched)  # no weights downloaded
    # A weight file whose recorded hash changes changes the fingerprint (the hub's word is used).
    unet = next(s for s in siblings if s.rfilename == UNET)
    unet.lfs = BlobLfsInfo(unet.lfs.size, "f" * 64, 134)
    assert model_fingerprint("someone/tiny-sd", tmp_path / "digests").changed(got) == ["unet"]
    # Hub errors (no such repository, no network) are one line naming the model.
    monkeypatch.setattr(
        huggingface_hub.HfApi, "model_info", lambda *a, **k: (_ for _ in ()).throw(OSError("boom"))
    )
    with pytest.raises(ModelLoadError, match="model 'someone/tiny-sd': its files cannot be fetched: boom"):
        model_fingerprint("someone/tiny-sd")


def test_a_hub_snapshot_whose_index_changed_during_the_download_is_refused(model, tmp_path, monkeypatch):
    """The files to fetch are chosen by the model_index.json read before the download; if the
    downloaded commit's index names other components (a push in between), the snapshot would
    lack some of them: refused in one line, not loaded half."""
    import json

    import huggingface_hub

    from mace_core.source_folder import hub_snapshot

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    newer = tmp_path / "newer"
    shutil.copytree(model, newer)
    index = json.loads((newer / "model_index.json").read_text())
    index["text_encoder_2"] = ["transformers", "CLIPTextModel"]
    (newer / "model_index.json").write_text(json.dumps(index))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, f, **_: str(model / f))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **_: str(model))
    assert hub_snapshot("someone/tiny-sd").path == model  # the same commit: as before
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **_: str(newer))
    with pytest.raises(ModelLoadError, match="'someone/tiny-sd' changed on the hub while it was downloaded"):
        hub_snapshot("someone/tiny-sd")
