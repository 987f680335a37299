"""What a run writes is the source pipeline plus a diff, in the source's precision (issue 28,
items 1 and 2).

A tiny SD 1.x release saved in fp16, WITH a safety checker, a feature extractor and a PNDM
scheduler, and beside its UNet weights an fp32 variant (the same weights: rewritten with
the edit), an EMA-like variant (other weights: left out) and a ``.bin`` file (never read:
left out). ``erase`` (local and Ray), ``--stages cfr`` and ``apply`` must each give a folder
in which every other file is the source's byte for byte and the UNet weight files differ
from the source's only in the attn2 to_k / to_v tensors' bytes (header, metadata, dtype
and every other tensor identical). SD 2.x (sharded UNet) and SDXL: ``--stages cfr`` and
``apply``. Statistics in float32 whatever the checkpoint's dtype: the fp16 folder and the
same weights saved in fp32 give the same erasure.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from helpers import SETTINGS, erasure, report

from mace_core.concepts import ConceptType
from mace_core.source_folder import folder_files
from mace_ray.erase.apply import apply_erasure_file
from mace_ray.erase.driver import run_erase
from mace_ray.erase.request import EraseRequest

KV = re.compile(r"\.attn2\.to_[kv]\.weight$")
LEFT_OUT = {"unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.ema.safetensors"}


def release(pipe, folder: Path, shard: bool = False) -> Path:
    """``pipe`` saved in fp16 as a model provider ships it (sharded UNet if ``shard``)."""
    pipe = pipe.to(torch.float16)
    pipe.save_pretrained(folder, safe_serialization=True)
    if shard:
        shutil.rmtree(folder / "unet")
        pipe.unet.save_pretrained(folder / "unet", safe_serialization=True, max_shard_size="400KB")
    return folder


def tiny_safety_checker():  # -> StableDiffusionSafetyChecker
    """A random StableDiffusionSafetyChecker in tiny widths (its CLIP vision tower and
    concept embeddings): what an SD 1.x release folder carries beside the model."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    config = CLIPConfig(
        text_config=dict(tower, vocab_size=1000, bos_token_id=0, eos_token_id=2, pad_token_id=1),
        vision_config=dict(tower, image_size=32, patch_size=8),
        projection_dim=16,
    )
    return StableDiffusionSafetyChecker(config).eval()


def tiny_feature_extractor():  # -> CLIPImageProcessor
    """The safety checker's image processor at the tiny checker's 32 px."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


def sd1_release(folder: Path) -> Path:
    """The tiny SD 1.x pipeline as SD v1.4 ships: PNDM, a safety checker and its feature
    extractor, fp16; and three more UNet weight files (see the module)."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    from mace_core.families.sd1 import build_tiny_pipeline
    from mace_core.families.tiny import SD_NOISE_SCHEDULE

    p = build_tiny_pipeline()
    pipe = StableDiffusionPipeline(
        vae=p.vae,
        text_encoder=p.text_encoder,
        tokenizer=p.tokenizer,
        unet=p.unet,
        scheduler=PNDMScheduler(num_train_timesteps=1000, skip_prk_steps=True, **SD_NOISE_SCHEDULE),
        safety_checker=tiny_safety_checker(),
        feature_extractor=tiny_feature_extractor(),
        requires_safety_checker=True,
    )
    release(pipe, folder)
    unet = pipe.unet
    unet.to(torch.float32).save_pretrained(folder / "unet", variant="fp32", safe_serialization=True)
    with torch.no_grad():  # other weights: an EMA copy the erasure was not computed on
        for name, w in unet.named_parameters():
            if KV.search(name):
                w.add_(0.01)
    unet.save_pretrained(folder / "unet", variant="ema", safe_serialization=True)
    # Never read (nor unpickled): only its name matters.
    (folder / "unet/diffusion_pytorch_model.bin").write_bytes(b"pickled weights would be here")
    return folder


def assert_source_plus_diff(source: Path, erased: Path, left_out: set[str] = frozenset()) -> None:
    """Every file of ``source`` but ``left_out`` is in ``erased``, byte for byte, except the
    UNet's safetensors files, whose header bytes are the source's and whose tensors differ
    exactly in the attn2 to_k / to_v ones."""
    assert set(folder_files(erased)) == set(folder_files(source)) - left_out
    edited = 0
    for rel in folder_files(erased):
        a, b = (source / rel).read_bytes(), (erased / rel).read_bytes()
        if not (rel.startswith("unet/") and rel.endswith(".safetensors")):
            assert a == b, rel
            continue
        n = int.from_bytes(a[:8], "little")
        assert len(a) == len(b) and a[: 8 + n] == b[: 8 + n], rel  # names, dtypes, shapes, metadata
        header = {k: v for k, v in json.loads(a[8 : 8 + n]).items() if k != "__metadata__"}
        changed = set()
        for name, e in header.items():
            start, end = (8 + n + x for x in e["data_offsets"])
            if a[start:end] != b[start:end]:
                changed.add(name)
        kv = {k for k in header if KV.search(k)}
        assert changed == kv, (rel, sorted(changed ^ kv)[:3])
        edited += len(kv)
    assert edited


def unet_dtypes(folder: Path, rel: str = "unet/diffusion_pytorch_model.safetensors") -> set[str]:
    data = (folder / rel).read_bytes()
    n = int.from_bytes(data[:8], "little")
    return {e["dtype"] for k, e in json.loads(data[8 : 8 + n]).items() if k != "__metadata__"}


def erase(model: Path, out: Path, **kw) -> dict:
    cfile = out.parent / f"{out.name}-concepts.txt"
    cfile.parent.mkdir(parents=True, exist_ok=True)
    cfile.write_text("airplane | object | sky\n")
    req = EraseRequest(
        concept_file=str(cfile),
        model=str(model),
        output=str(out),
        default_type=ConceptType.OBJECT,
        settings=SETTINGS,
        **{"executor": "local", **kw},
    )
    return run_erase(req)


@pytest.fixture(scope="module")
def sd1(tmp_path_factory) -> Path:
    return sd1_release(tmp_path_factory.mktemp("sd1") / "sd14-fp16")


@pytest.fixture(scope="module")
def sd1_erased(sd1, tmp_path_factory) -> Path:
    """The full method on the fp16 release, in this process."""
    return Path(erase(sd1, tmp_path_factory.mktemp("sd1-erase") / "out")["output"]["root"])


@pytest.fixture(scope="module")
def sd1_cfr(sd1, tmp_path_factory) -> Path:
    return Path(erase(sd1, tmp_path_factory.mktemp("sd1-cfr") / "out", stages="cfr")["output"]["root"])


def test_erase_writes_the_source_plus_the_attn2_diff(sd1, sd1_erased):
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    final = sd1_erased / "final/pipeline"
    # Generating images swapped the worker's scheduler for DPM-Solver; none of it is written.
    assert_source_plus_diff(sd1, final, LEFT_OUT)
    assert unet_dtypes(final) == {"F16"}
    assert unet_dtypes(final, "unet/diffusion_pytorch_model.fp32.safetensors") == {"F32"}
    files = report(sd1_erased)["pipeline_files"]
    assert set(files["left_out"]) == LEFT_OUT and "never reads" in files["left_out"][min(LEFT_OUT)]
    assert files["rewritten"] == [
        "unet/diffusion_pytorch_model.fp32.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
    ]
    # As a user loads it: the source's sampler and safety checker, the erased attn2 in fp16.
    pipe = StableDiffusionPipeline.from_pretrained(final, local_files_only=True)
    assert type(pipe.scheduler) is PNDMScheduler and pipe.safety_checker is not None
    fused = erasure(sd1_erased)
    state = pipe.unet.state_dict()
    assert all(torch.equal(state[k], fused[k].half().float()) for k in fused)
    # variant="fp32" loads the erased weights too, at full precision.
    v32 = StableDiffusionPipeline.from_pretrained(final, variant="fp32", local_files_only=True)
    assert all(torch.equal(v32.unet.state_dict()[k], fused[k]) for k in fused)


def test_ray_erase_writes_the_source_plus_the_attn2_diff(sd1, sd1_erased, local_ray, tmp_path):
    rep = erase(sd1, tmp_path / "out", executor="ray", workers=1, gpus_per_worker=1)
    root = Path(rep["output"]["root"])
    assert rep["executor"] == "ray"
    assert_source_plus_diff(sd1, root / "final/pipeline", LEFT_OUT)
    a, b = erasure(root), erasure(sd1_erased)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_cfr_stage_and_apply_write_the_source_plus_the_attn2_diff(sd1, sd1_cfr, sd1_erased, tmp_path):
    final = sd1_cfr / "final/pipeline"
    assert_source_plus_diff(sd1, final, LEFT_OUT)
    assert unet_dtypes(final) == {"F16"}
    # apply makes the run's own folder, byte for byte, from the compact file and the model.
    for i, root in enumerate((sd1_cfr, sd1_erased)):
        out = tmp_path / f"applied{i}"
        written = apply_erasure_file(root / "final/erasure.safetensors", out)
        assert set(written.left_out) == LEFT_OUT
        assert folder_files(out) == folder_files(root / "final/pipeline")
        assert all(
            (out / f).read_bytes() == (root / "final/pipeline" / f).read_bytes() for f in folder_files(out)
        )


def test_fp16_and_fp32_saved_weights_give_the_same_erasure(sd1, sd1_cfr, tmp_path):
    """The same weights saved in fp32: statistics are computed in float32 from both."""
    from mace_core.models import load_pipeline

    fp32 = tmp_path / "sd14-fp32"
    load_pipeline(str(sd1)).save_pretrained(fp32, safe_serialization=True)  # fp16 values, upcast
    rep = erase(fp32, tmp_path / "out", stages="cfr")
    a, b = erasure(Path(rep["output"]["root"])), erasure(sd1_cfr)
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff <= 1e-6, diff
    assert unet_dtypes(Path(rep["output"]["root"]) / "final/pipeline") == {"F32"}


def test_text_side_of_an_fp16_checkpoint_encodes_in_float32(sd1):
    from mace_core.models import load_pipeline, load_prompt_encoder, pipeline_prompt_encoder
    from mace_core.text_stats import prior_cache_key

    cpu = torch.device("cpu")
    text = load_prompt_encoder(str(sd1), cpu)  # the CPU text workers'
    assert {p.dtype for p in text.model.parameters()} == {torch.float32}
    gpu = pipeline_prompt_encoder(load_pipeline(str(sd1)), cpu)  # the GPU workers'
    prompts = ["a photo of an airplane", "a painting in the style of Van Gogh"]
    assert torch.equal(text.encode(prompts), gpu.encode(prompts))
    # The prior cache is keyed by the dtype the states were computed in.
    assert prior_cache_key("t", ["a"]) != prior_cache_key("t", ["a"], torch.float16)
    assert prior_cache_key("t", ["a"]) == prior_cache_key("t", ["a"], torch.float32)


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_other_families_cfr_and_apply(family, tmp_path):
    from mace_core.families import family_named

    source = release(family_named(family).build_tiny_pipeline(), tmp_path / family, shard=family == "sd2")
    if family == "sd2":  # sharded: every shard rewritten where it holds an edited tensor
        assert len([f for f in folder_files(source / "unet") if f.endswith(".safetensors")]) > 1
    root = Path(erase(source, tmp_path / "out", stages="cfr")["output"]["root"])
    assert_source_plus_diff(source, root / "final/pipeline")
    apply_erasure_file(root / "final/erasure.safetensors", tmp_path / "applied")
    assert_source_plus_diff(source, tmp_path / "applied")
