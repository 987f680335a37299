"""Writing an erased folder from a source folder, file by file, on hand-made pipeline folders
(no model is built or loaded): sharded and variant weights, files left out and why, any
edited component and tensor names, and the sources ``apply`` copies from (a hub id's cached
snapshot, an s3:// model's cached copy)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mace_core.checkpoints import erasure_bytes
from mace_core.erased_folder import write_erased_folder
from mace_core.errors import ArtefactError, MaceError, ModelLoadError
from mace_core.source_folder import SourceFolder, folder_files
from mace_ray.erase.apply import apply_erasure_file

K, V = "mid.attn2.to_k.weight", "mid.attn2.to_v.weight"
META = {"format": "pt", "note": "kept"}


def weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(shape, generator=g)
        for name, shape in ((K, (4, 6)), (V, (4, 6)), ("conv.weight", (8, 3)))
    }


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def save(tensors: dict[str, torch.Tensor], path: Path, dtype: torch.dtype) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()}, path, metadata=META)


def pipeline_folder(root: Path) -> Path:
    """An SD 1.x-like folder: configs and small weight files, the UNet's in fp16 and sharded,
    an fp32 variant of them (the same weights), a non-EMA variant (other weights), pickled
    copies with their index, and a hidden download cache."""
    write_json(
        root / "model_index.json",
        {
            "_class_name": "StableDiffusionPipeline",
            **{c: ["diffusers", "X"] for c in ("unet", "vae", "scheduler")},
            **{c: ["transformers", "X"] for c in ("text_encoder", "tokenizer", "feature_extractor")},
            "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
        },
    )
    for c in ("unet", "vae", "text_encoder", "safety_checker"):
        write_json(root / c / "config.json", {"name": c})
    write_json(root / "tokenizer/tokenizer_config.json", {"pad_token": "<|endoftext|>"})
    write_json(root / "scheduler/scheduler_config.json", {"_class_name": "PNDMScheduler"})
    write_json(root / "feature_extractor/preprocessor_config.json", {"crop_size": 32})
    save(weights(1), root / "text_encoder/model.safetensors", torch.float16)
    save(weights(2), root / "safety_checker/model.safetensors", torch.float16)
    save(weights(3), root / "vae/diffusion_pytorch_model.safetensors", torch.float16)
    w = weights()
    unet = root / "unet"
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": [K, "conv.weight"]}
    shards["diffusion_pytorch_model-00002-of-00002.safetensors"] = [V]
    for name, keys in shards.items():
        save({k: w[k] for k in keys}, unet / name, torch.float16)
    index = {"metadata": {"total_size": 0}, "weight_map": {k: n for n, keys in shards.items() for k in keys}}
    write_json(unet / "diffusion_pytorch_model.safetensors.index.json", index)
    save(
        {k: v.half().float() for k, v in w.items()},
        unet / "diffusion_pytorch_model.fp32.safetensors",
        torch.float32,
    )
    save(weights(9), unet / "diffusion_pytorch_model.non_ema.safetensors", torch.float16)
    (unet / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    write_json(
        unet / "diffusion_pytorch_model.bin.index.json", {"weight_map": {K: "diffusion_pytorch_model.bin"}}
    )
    write_json(root / ".cache/huggingface/download/x.json", {})
    return root


EDIT = {K: torch.full((4, 6), 0.5), V: torch.full((4, 6), -0.25)}
REWRITTEN = [
    "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
    "unet/diffusion_pytorch_model-00002-of-00002.safetensors",
    "unet/diffusion_pytorch_model.fp32.safetensors",
]
LEFT_OUT = {
    "unet/diffusion_pytorch_model.bin",
    "unet/diffusion_pytorch_model.bin.index.json",
    "unet/diffusion_pytorch_model.non_ema.safetensors",
}


def tensors_and_metadata(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118 (not iterable)


def check_erased(source: Path, out: Path, left_out: set[str]) -> None:
    assert set(folder_files(out)) == set(folder_files(source)) - left_out
    for rel in folder_files(out):
        if rel not in REWRITTEN:
            assert (out / rel).read_bytes() == (source / rel).read_bytes(), rel
            continue
        (a, meta_a), (b, meta_b) = tensors_and_metadata(source / rel), tensors_and_metadata(out / rel)
        assert meta_a == meta_b == META and a.keys() == b.keys()
        for k in a:
            assert b[k].dtype == a[k].dtype
            assert torch.equal(b[k], EDIT[k].to(a[k].dtype) if k in EDIT else a[k]), (rel, k)


def test_sharded_and_variant_weights_are_rewritten_and_stale_copies_left_out(tmp_path):
    source = pipeline_folder(tmp_path / "model")
    files = folder_files(source)
    assert not any(f.startswith(".") for f in files)  # a download tool's cache is not the model
    written = write_erased_folder(SourceFolder(source, files), tmp_path / "out", "unet", EDIT)
    assert written.rewritten == REWRITTEN and set(written.left_out) == LEFT_OUT
    assert "never reads" in written.left_out["unet/diffusion_pytorch_model.bin"]
    assert "differs from the weights" in written.left_out["unet/diffusion_pytorch_model.non_ema.safetensors"]
    assert len(written.notes()) == 3
    check_erased(source, tmp_path / "out", LEFT_OUT)


def test_any_component_and_tensor_names(tmp_path):
    """FLUX / SD3 edit ``context_embedder`` of their ``transformer``: the writer is told which."""
    root = tmp_path / "flux"
    write_json(root / "model_index.json", {"_class_name": "FluxPipeline"})
    w = {"context_embedder.weight": torch.randn(6, 4), "x_embedder.weight": torch.randn(6, 2)}
    save(w, root / "transformer/diffusion_pytorch_model.safetensors", torch.bfloat16)
    save(weights(), root / "unet/diffusion_pytorch_model.safetensors", torch.float16)  # not the edited one
    edit = {"context_embedder.weight": torch.ones(6, 4)}
    write_erased_folder(SourceFolder(root, folder_files(root)), tmp_path / "out", "transformer", edit)
    got, _ = tensors_and_metadata(tmp_path / "out/transformer/diffusion_pytorch_model.safetensors")
    assert got["context_embedder.weight"].dtype == torch.bfloat16
    assert torch.equal(got["context_embedder.weight"], torch.ones(6, 4, dtype=torch.bfloat16))
    assert torch.equal(got["x_embedder.weight"], w["x_embedder.weight"].bfloat16())
    unet = "unet/diffusion_pytorch_model.safetensors"
    assert (tmp_path / "out" / unet).read_bytes() == (root / unet).read_bytes()


def test_an_erasure_that_does_not_fit_the_model_is_refused(tmp_path):
    source = pipeline_folder(tmp_path / "model")
    folder = SourceFolder(source, folder_files(source))
    with pytest.raises(ArtefactError, match=r"tensor 'other.attn2.to_k.weight' is not in unet/"):
        write_erased_folder(folder, tmp_path / "a", "unet", {"other.attn2.to_k.weight": torch.ones(4, 6)})
    with pytest.raises(ArtefactError, match=r"has shape \(4, 6\); the edit's is \(6, 4\)"):
        write_erased_folder(folder, tmp_path / "b", "unet", {K: torch.ones(6, 4)})
    with pytest.raises(ModelLoadError, match="vae/ has no safetensors weights that are loaded"):
        (source / "vae/diffusion_pytorch_model.safetensors").rename(
            source / "vae/diffusion_pytorch_model.fp16.safetensors"
        )
        write_erased_folder(SourceFolder(source, folder_files(source)), tmp_path / "c", "vae", {})


def erasure_file(path: Path, base: str, fingerprint: str | None = None) -> Path:
    meta = {"base_model": base, "component": "unet"}
    if fingerprint:
        meta["model_fingerprint"] = fingerprint
    path.write_bytes(erasure_bytes(EDIT, meta))
    return path


def test_apply_refuses_an_output_that_is_not_empty(tmp_path):
    source = pipeline_folder(tmp_path / "model")
    out = tmp_path / "out"
    (out / "unet").mkdir(parents=True)
    (out / "unet/diffusion_pytorch_model.fp16.safetensors").write_bytes(b"old")
    with pytest.raises(MaceError, match="is not empty; give a new or empty folder"):
        apply_erasure_file(erasure_file(tmp_path / "e.safetensors", str(source)), out)
    (out / "unet/diffusion_pytorch_model.fp16.safetensors").unlink()
    (out / "unet").rmdir()
    apply_erasure_file(erasure_file(tmp_path / "e.safetensors", str(source)), out)  # empty: fine
    check_erased(source, out, LEFT_OUT)
    assert not list(tmp_path.glob(".out.*"))  # no staging folder left behind


def test_apply_copies_a_hub_models_cached_snapshot(tmp_path, monkeypatch):
    """Offline, a hub id's snapshot in the Hugging Face cache is the source: model_index.json
    and every component it names, without pickled and variant weights."""
    import huggingface_hub.constants

    from mace_ray.storage.resolve import Sources

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub/models--someone--tiny-sd"
    snapshot = pipeline_folder(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs/main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    fingerprint = Sources().fingerprint("someone/tiny-sd").full
    written = apply_erasure_file(
        erasure_file(tmp_path / "e.safetensors", "someone/tiny-sd", fingerprint), tmp_path / "out"
    )
    assert not written.left_out  # never part of the source: nothing stale to leave out
    not_copied = LEFT_OUT | {"unet/diffusion_pytorch_model.fp32.safetensors"}
    check_erased(snapshot, tmp_path / "out", not_copied)
    assert (tmp_path / "out/safety_checker/model.safetensors").is_file()
    # A snapshot that lacks a component the model names cannot make a whole pipeline.
    for f in (snapshot / "feature_extractor").iterdir():
        f.unlink()
    with pytest.raises(ModelLoadError, match="cached snapshot has no feature_extractor/"):
        apply_erasure_file(erasure_file(tmp_path / "e.safetensors", "someone/tiny-sd"), tmp_path / "out2")


def test_apply_copies_an_s3_models_cached_copy(tmp_path, aws_env, bucket, monkeypatch):
    from mace_ray.storage.resolve import Sources
    from mace_ray.storage.s3 import S3Storage

    source = pipeline_folder(tmp_path / "model")
    S3Storage(f"s3://{bucket}/models", aws_env.endpoint).put_dir(source, "tiny-sd")
    monkeypatch.setenv("MACE_MODEL_CACHE", str(tmp_path / "cache"))
    uri = f"s3://{bucket}/models/tiny-sd"
    erasure = erasure_file(tmp_path / "e.safetensors", uri, Sources(aws_env.endpoint).fingerprint(uri).full)
    written = apply_erasure_file(erasure, tmp_path / "out", s3_endpoint=aws_env.endpoint)
    assert set(written.left_out) == LEFT_OUT
    check_erased(source, tmp_path / "out", LEFT_OUT)
