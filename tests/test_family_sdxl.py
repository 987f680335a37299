"""SDXL end to end on a tiny random SDXL-shaped pipeline saved as a diffusers folder:
recognised from its files, two text encoders concatenated, pooled and size conditioning,
text statistics, images, LoRA training, attention mass and a whole erase run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from family_fixtures import tiny_folder_and_pipe
from helpers import assert_text_statistics, tiny_settings, train_and_attention_mass

from mace_core.concepts import Concept, ConceptType
from mace_core.errors import ConceptError
from mace_core.families import family_for, family_named, family_of_pipeline
from mace_core.families.sdxl import build_tiny_pipeline
from mace_core.models import load_prompt_encoder
from mace_core.train import loss_token_mask

CPU = torch.device("cpu")
CLINTON = Concept("Bill Clinton", ConceptType.CELEBRITY, "a man")
SDXL = family_named("sdxl")
D = 64  # 32 + 32: both tiny text encoders
model_folder, pipe = tiny_folder_and_pipe(SDXL)


def test_the_folder_is_recognised_and_loads_as_sdxl(model_folder, pipe):
    assert family_for(str(model_folder)) is SDXL and family_of_pipeline(pipe) is SDXL
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    assert pipe.unet.config.cross_attention_dim == D and pipe.unet.config.addition_embed_type == "text_time"
    assert (pipe.tokenizer_2.pad_token, pipe.tokenizer_2.pad_token_id) == ("!", 0)
    assert pipe.tokenizer.pad_token == "<|endoftext|>"
    a, b = build_tiny_pipeline().unet.state_dict(), pipe.unet.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_prompt_encoder_concatenates_both_encoders_and_pads_by_position(model_folder, pipe):
    enc = load_prompt_encoder(str(model_folder), CPU)
    full = SDXL.prompt_encoder(SDXL.text_components(pipe), CPU)
    prompts = ["a photo of Bill Clinton!", "a dog"]
    states = enc.encode(prompts)
    assert enc.dim == D and states.shape == (2, 77, D) and states.dtype == torch.float32
    assert torch.equal(states, full.encode(prompts))
    # The pipeline's own prompt embeddings: the same context and pooled embeddings.
    pe, _, pooled, _ = pipe.encode_prompt(prompts, device=CPU, do_classifier_free_guidance=False)
    assert torch.allclose(states, pe, atol=1e-6)
    cond = enc.conditioning(prompts)
    assert torch.allclose(cond["text_embeds"], pooled, atol=1e-6)
    assert cond["time_ids"].tolist() == [[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 2
    # Both tokenizers: the same ids apart from padding (end-of-text vs '!').
    ids = enc.ids("a photo of Bill Clinton!")
    t1 = pipe.tokenizer("a photo of Bill Clinton!", padding="max_length", max_length=77).input_ids
    t2 = pipe.tokenizer_2("a photo of Bill Clinton!", padding="max_length", max_length=77).input_ids
    n = len(ids)
    assert t1[:n] == ids and set(t1[n:]) == {49407} and set(t2[n:]) == {0}
    assert t2[:n] == [0 if i == 256 else i for i in ids]  # its '!' is its pad token, id 0
    assert enc.ids("a dog") == pipe.tokenizer_2("a dog").input_ids
    with pytest.raises(ConceptError, match="repeated"):
        enc.ids("hi!!")
    # Eq. 3 mask: concept tokens + end-of-text and after, whatever the pad token.
    mask = loss_token_mask(enc, "a photo of Bill Clinton!", CLINTON, penalize_eot=True)
    assert mask.shape[-1] == 77 and mask.flatten()[4:6].all() and mask.flatten()[n - 1 :].all()
    assert not mask.flatten()[:4].any()


def test_text_statistics(model_folder):
    assert_text_statistics(load_prompt_encoder(str(model_folder), CPU), CLINTON, D)


def test_images_training_and_attention_mass(pipe):
    train_and_attention_mass(pipe, SDXL, CLINTON, 64)


SDXL_CONCEPTS = "Bill Clinton | celebrity\nairplane | object\n"
SDXL_SETTINGS = tiny_settings(inference_steps=2)


@pytest.fixture(scope="module")
def local_run(model_folder, tmp_path_factory) -> dict:
    from mace_ray.erase.driver import run_erase
    from mace_ray.erase.request import EraseRequest

    tmp = tmp_path_factory.mktemp("sdxl-run")
    cfile = tmp / "concepts.txt"
    cfile.write_text(SDXL_CONCEPTS)
    req = EraseRequest(
        concept_file=str(cfile),
        model=str(model_folder),
        output=str(tmp / "out"),
        settings=SDXL_SETTINGS,
        executor="local",
        concepts_per_batch=2,
    )
    return run_erase(req)


def test_erase_run_end_to_end(model_folder, local_run):
    from diffusers import StableDiffusionXLPipeline

    residuals = [c["erasure"]["residual"] for c in local_run["concepts"]]
    print("SDXL residuals", residuals)
    assert all(r < 0.9 for r in residuals)
    final = Path(local_run["output"]["root"]) / "final" / "pipeline"
    out = StableDiffusionXLPipeline.from_pretrained(final)
    src = StableDiffusionXLPipeline.from_pretrained(model_folder)
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(src, part).state_dict(), getattr(out, part).state_dict()
        assert a.keys() == b.keys()
        changed = {k for k in a if not torch.equal(a[k], b[k])}
        if part == "unet":
            assert changed and all(".attn2.to_k." in k or ".attn2.to_v." in k for k in changed)
        else:
            assert not changed, part


def test_fingerprint_covers_the_second_text_encoder(model_folder, tmp_path):
    """A changed text_encoder_2 is a different model (run id) and a different text side
    (prior-cache key): nothing built from the old one is reused."""
    import shutil

    from safetensors.torch import load_file, save_file

    from mace_core.fingerprint import ModelFingerprint, folder_fingerprint

    folder, cache = tmp_path / "m", tmp_path / "digests"
    shutil.copytree(model_folder, folder)
    before = folder_fingerprint(folder, cache)
    assert {"text_encoder_2", "tokenizer_2"} <= before.components.keys()
    weights = folder / "text_encoder_2" / "model.safetensors"
    state = load_file(weights)
    key = next(k for k in state if k.endswith("final_layer_norm.weight"))
    state[key] = state[key] + 1
    save_file(state, weights, metadata={"format": "pt"})
    after = folder_fingerprint(folder, cache)
    assert after.changed(before) == ["text_encoder_2"]
    assert after.full != before.full and after.text != before.text
    # A one-encoder model's text key does not depend on the SDXL-only components.
    one = ModelFingerprint({"text_encoder": "a", "tokenizer": "b", "unet": "c"})
    assert one.text == one.of(("text_encoder", "tokenizer"))


def test_erase_through_ray_from_and_to_s3(aws_env, bucket, model_folder, local_run, tmp_path, monkeypatch):
    """The model read from s3:// (the driver fetches only the text side, both encoders), the
    run written to s3://, the concepts trained by Ray workers: the local run's result."""
    from helpers import assert_same_erasure, small_local_ray

    from mace_core.checkpoints import read_erasure
    from mace_ray.erase.driver import run_erase
    from mace_ray.erase.request import EraseRequest
    from mace_ray.storage.model_cache import TEXT_COMPONENTS
    from mace_ray.storage.resolve import Sources
    from mace_ray.storage.s3 import S3Storage

    monkeypatch.setenv("MACE_MODEL_CACHE", str(tmp_path / "models"))
    S3Storage(f"s3://{bucket}/models", aws_env.endpoint).put_dir(model_folder, "tiny-sdxl")
    uri = f"s3://{bucket}/models/tiny-sdxl"
    text_side = Path(Sources(aws_env.endpoint).pipeline(uri, TEXT_COMPONENTS))
    assert sorted(p.name for p in text_side.iterdir()) == [
        "model_index.json",
        "text_encoder",
        "text_encoder_2",
        "tokenizer",
        "tokenizer_2",
    ]
    cfile = tmp_path / "concepts.txt"
    cfile.write_text(SDXL_CONCEPTS)
    req = EraseRequest(
        concept_file=str(cfile),
        model=uri,
        output=f"s3://{bucket}/runs-out",
        settings=SDXL_SETTINGS,
        s3_endpoint=aws_env.endpoint,
        concepts_per_batch=2,
        workers=1,
        gpus_per_worker=1,
    )
    with small_local_ray(num_gpus=1):  # started with the S3 credentials in its environment
        rep = run_erase(req)
    assert rep["executor"] == "ray"
    out = S3Storage(f"s3://{bucket}/runs-out", aws_env.endpoint)
    got = read_erasure(out.read_bytes(f"runs/{rep['run_id']}/final/erasure.safetensors"))[0]
    want = read_erasure((Path(local_run["output"]["root"]) / "final" / "erasure.safetensors").read_bytes())[0]
    assert_same_erasure(got, want)


# Prompts with a literal '!': the second tokenizer gives it its pad token's id (0).
PAIRS = [
    ("a photo of Bill Clinton!", "a photo of a man!"),
    ("Bill Clinton! at the beach", "a man! at the beach"),
    ("a portrait of Bill Clinton", "a portrait of a man wearing a hat"),
]


@pytest.mark.parametrize(("concept_prompt", "anchor_prompt"), PAIRS)
def test_alignment_pairs_padding_in_order_for_both_tokenizers(pipe, concept_prompt, anchor_prompt):
    from mace_core.alignment import align_tokens

    enc = SDXL.prompt_encoder(SDXL.text_components(pipe), CPU)
    f, g = enc.ids(concept_prompt), enc.ids(anchor_prompt)
    al = align_tokens(f, g, enc.max_length)
    pairs = list(zip(al.concept_positions, al.anchor_positions, strict=True))
    assert (len(f) - 1, len(g) - 1) in pairs
    pads = [(i, j) for i, j in pairs if i >= len(f) and j >= len(g)]
    assert pads == [(len(f) + n, len(g) + n) for n in range(enc.max_length - max(len(f), len(g)))]
    for tok, pad_id in ((pipe.tokenizer, 49407), (pipe.tokenizer_2, 0)):  # every position pairs like roles
        fp, gp = (
            tok(p, padding="max_length", max_length=77).input_ids for p in (concept_prompt, anchor_prompt)
        )
        assert all(fp[i] == gp[j] for i, j in pairs)
        assert {fp[i] for i, _ in pads} == {gp[j] for _, j in pads} == {pad_id}
    assert [f[i] for i in al.concept_tokens] == enc.ids("Bill Clinton")[1:-1]
