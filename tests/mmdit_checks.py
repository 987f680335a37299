"""Checks shared by the FLUX.1 and SD 3.x family tests: a tiny random MMDiT pipeline saved as a
diffusers folder, its text side against the pipeline's own prompt encoding, the joint
attention probes and LoRA training (Eq. 3), and erase runs (local, Ray, S3) whose output
differs from the source only in the declared projections (``MMDiTFamilyTests``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch

from mace_core.concept_job import ConceptBatchWorker
from mace_core.concepts import Concept, ConceptType
from mace_core.errors import ConceptError
from mace_core.families.base import ModelFamily
from mace_core.families.mmdit import CONTEXT_KEY, POOLED_KEY
from mace_core.settings import DataSettings, EraseSettings, MaskSettings, TrainSettings
from mace_core.train import concept_token_mask, loss_token_mask

CPU = torch.device("cpu")


def gpu_precision(worker: Any) -> bool:
    """``ConceptBatchWorker.mixed_precision`` as on a GPU, for a CPU test: --precision auto."""
    return worker.settings.precision == "auto"


CLINTON = Concept("Bill Clinton", ConceptType.CELEBRITY, "a man")
# Two celebrities with the defaults (the paper's per-type weights for N = 2, 30 prompts per
# concept, the Gaussian LoRA init), only the data made small and 10 LoRA steps: on random
# images the closed forms carry the erasure (test_strength.py).
CELEBRITIES = "Tom Hanks | celebrity\nBrad Pitt | celebrity\n"
DEFAULTS = EraseSettings(
    data=DataSettings(images_per_concept=2, inference_steps=2),
    masks=MaskSettings(masker="whole-image"),
    train=TrainSettings(steps=10),
)


def check_text_side(family, enc, pipe, prompts: list[str]) -> None:
    """The encoder's context and pooled embedding are the pipeline's own; ``encode`` lays
    them out as context rows [state, 0] and one pooled row [0, pooled]."""
    cond = enc.conditioning(prompts)
    if family.name == "flux":
        context, pooled, _ = pipe.encode_prompt(prompts, None, device=CPU, max_sequence_length=enc.max_length)
    else:
        context, _, pooled, _ = pipe.encode_prompt(
            prompts,
            None,
            None,
            device=CPU,
            do_classifier_free_guidance=False,
            max_sequence_length=enc.max_length,
        )
    assert torch.allclose(cond["context"], context, atol=1e-6) and torch.allclose(
        cond["pooled"], pooled, atol=1e-6
    )
    rows = enc.encode(prompts)
    joint = pipe.transformer.config.joint_attention_dim
    assert rows.shape == (len(prompts), enc.tokens + 1, enc.dim) and enc.dim == joint + pooled.shape[-1]
    assert (
        torch.equal(rows[:, : enc.tokens, :joint], cond["context"])
        and not rows[:, : enc.tokens, joint:].any()
    )
    assert torch.equal(rows[:, -1, joint:], cond["pooled"]) and not rows[:, -1, :joint].any()


def check_t5_segment(enc, tokenizer, offset: int) -> None:
    """T5's rules at ``offset`` of the context: no start token, </s> (1) at the end, <pad> (0)
    after it; Stage 1 pairs the padding in order and the pooled rows together; Eq. 3 masks the
    concept's tokens and, with end-of-text, </s> and the padding."""
    prompt, anchor = "a photo of Bill Clinton at the beach", "a photo of a man at the beach"
    ids = tokenizer(prompt).input_ids
    padded = tokenizer(prompt, padding="max_length", max_length=enc.max_length).input_ids
    n = len(ids)
    assert ids[-1] == tokenizer.eos_token_id == 1 and tokenizer.convert_ids_to_tokens(ids[0]) == "▁a"
    assert padded[:n] == ids and set(padded[n:]) == {tokenizer.pad_token_id} == {0}
    name = tokenizer("Bill Clinton").input_ids[:-1]
    start = next(i for i in range(n) if ids[i : i + len(name)] == name)
    al = enc.align(prompt, anchor)
    pairs = set(zip(al.concept_positions, al.anchor_positions, strict=True))
    g = len(tokenizer(anchor).input_ids)
    assert (enc.tokens, enc.tokens) in pairs  # the pooled rows
    assert {(offset + n + k, offset + g + k) for k in range(enc.max_length - max(n, g))} <= pairs
    assert (offset + n - 1, offset + g - 1) in pairs  # </s> with </s>
    assert set(range(offset + start, offset + start + len(name))) <= set(al.concept_tokens)
    concept = concept_token_mask(enc, prompt, CLINTON)
    eot = loss_token_mask(enc, prompt, CLINTON, penalize_eot=True)
    seg = slice(offset, offset + enc.max_length)
    assert concept[seg].nonzero().flatten().tolist() == list(range(start, start + len(name)))
    assert eot[seg].nonzero().flatten().tolist() == [
        *range(start, start + len(name)),
        *range(n - 1, enc.max_length),
    ]
    with pytest.raises(ConceptError, match="T5 tokens"):
        enc.check_length("a photo of " + "Bill Clinton " * 10, "concept")


def check_probes_and_training(enc, pipe, noise_scheduler) -> None:
    """The probes change nothing in the transformer's output and record image-query -> text
    probabilities per joint block; LoRA steps (Eq. 3 through the context_embedder hook) lower
    the concept's attention loss; the LoRA sits on context_embedder only, padded to the
    token-state space with zeros outside T5's columns."""
    from helpers import evaluate_attention_loss

    from mace_core.train import TrainJob, train_loras

    tr = pipe.transformer
    cond = enc.conditioning(["a photo of Bill Clinton", "a dog"])
    x, t = (
        torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)),
        noise_scheduler.model_time(torch.tensor([300, 700])),
    )
    with torch.no_grad():
        plain = enc.unet_forward(tr, x, t, cond).sample
        with enc.attention_probes(tr) as store:
            probed = enc.unet_forward(tr, x, t, cond).sample
    assert torch.allclose(plain, probed, atol=1e-5)
    blocks = len(tr.transformer_blocks)
    assert len(store) == blocks and all(p.shape[2:] == (64, enc.tokens) for p in store)
    assert all(0 < float(p.sum(-1).max()) < 1 for p in store)  # image keys take the rest
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    job = TrainJob(CLINTON, images, torch.ones(2, 32, 32, dtype=torch.bool), ["a photo of Bill Clinton"] * 2)
    settings = TrainSettings(steps=5, lr=1e-2)
    resolved = settings.resolve(CLINTON.type)
    (result,) = train_loras(tr, pipe.vae, noise_scheduler, enc, [job], settings, resolved, CPU)
    # Gradient checkpointing (on by default on CUDA) trains the same LoRA.
    enc.gradient_checkpointing = True
    try:
        (again,) = train_loras(tr, pipe.vae, noise_scheduler, enc, [job], settings, resolved, CPU)
    finally:
        enc.gradient_checkpointing = None
    assert not tr.gradient_checkpointing
    for k, (A, B) in result.lora.factors.items():
        A2, B2 = again.lora.factors[k]
        assert torch.allclose(A, A2, atol=1e-6) and torch.allclose(B, B2, atol=1e-6)
    assert set(result.lora.factors) == {CONTEXT_KEY} and result.lora.component == "transformer"
    A, B = result.lora.factors[CONTEXT_KEY]
    joint = tr.config.joint_attention_dim
    assert A.shape[1] == enc.dim and not A[:, joint:].any() and A[:, :joint].any() and B.any()
    before = evaluate_attention_loss(tr, pipe.vae, noise_scheduler, enc, job, settings, None, CPU, n=4)
    after = evaluate_attention_loss(tr, pipe.vae, noise_scheduler, enc, job, settings, result.lora, CPU, n=4)
    assert after < before, (before, after)


def erase(model: str, out: str, tmp: Path, **kw: Any) -> dict:
    """The default two-celebrity erase (``DEFAULTS``) of ``model`` into ``out``; ``kw``: more
    EraseRequest fields (executor, S3 endpoint, workers)."""
    from mace_ray.erase.driver import run_erase
    from mace_ray.erase.request import EraseRequest

    cfile = tmp / "concepts.txt"
    cfile.write_text(CELEBRITIES)
    return run_erase(EraseRequest(concept_file=str(cfile), model=model, output=out, settings=DEFAULTS, **kw))


def check_strength(rep: dict) -> None:
    """As strong as SD 1.x's defaults (tests/test_strength.py), figures from the run's report:
    the headline residual and drift are context_embedder's; the pooled projection's are
    reported beside them."""
    e = rep["erasure"]
    assert e["residual"]["pooled"] <= 0.42, e["residual"]
    assert e["prior_drift"] <= 0.035, e["prior_drift"]
    assert e["residual_cfr"]["pooled"] < 0.42
    # The pooled projection: closer to the anchors than before, little drift after the fusion.
    assert 0 < e["residual_pooled"]["max"] < 1 and e["prior_drift_pooled"] <= 0.035, e
    # ... and already after CFR, which a --method cfr run keeps: one pooled row per prompt must
    # not overfit (weighed as its own block, the scale once, it was residual 1.8, drift 0.65).
    assert 0 < e["residual_pooled_cfr"]["max"] < 1 and e["prior_drift_pooled_cfr"] <= 0.05, e
    # The attention mass of the joint attention, before and after (Eq. 3 on it: test_probes_...).
    assert all(0 < e["attention_mass"][k] < 1 for k in ("original", "erased"))
    check_pooled_weights(rep)


def check_pooled_weights(rep: dict) -> None:
    """The pooled block's counts reach the report through storage (one pooled row per prompt
    pair, prompt and caption), and its paper prior is one pooled row per MS-COCO caption,
    the scale once: raw prior x our captions = s x 616,767, in CFR as in the fusion."""
    from mace_core.closed_form_weights import PAPER_PRIOR_CAPTIONS, PAPER_WEIGHTS

    tokens, pooled = rep["tokens"], rep["tokens"]["pooled"]
    assert pooled["cfr_pairs"] == pooled["fusion"] == 60  # 2 concepts x 30 prompts
    assert tokens["prior"] % pooled["prior"] == 0 and tokens["prior"] // pooled["prior"] > 24  # rows/caption
    s = PAPER_WEIGHTS[ConceptType.CELEBRITY].prior
    for stage in ("cfr", "fusion"):
        raw = rep["raw_weights"][stage]["pooled"]
        assert raw["prior"] * pooled["prior"] == pytest.approx(s * PAPER_PRIOR_CAPTIONS, rel=1e-9)
        assert rep["weights"][stage]["pooled"]["prior"] == pytest.approx(s * PAPER_PRIOR_CAPTIONS / 60)


def check_output(pipeline_cls, folder: Path, root: Path) -> None:
    """final/pipeline loads with the family's pipeline class and differs from the source only
    in the declared projections; the erasure file holds them in their own shapes; a LoRA is
    stored at context_embedder's width, as PEFT loads it."""
    from mace_core.checkpoints import read_erasure
    from mace_core.lora import LoraFactors

    src = pipeline_cls.from_pretrained(folder)
    out = pipeline_cls.from_pretrained(root / "final" / "pipeline")
    for name, part in src.components.items():
        if not isinstance(part, torch.nn.Module):
            continue
        a, b = part.state_dict(), getattr(out, name).state_dict()
        assert a.keys() == b.keys(), name
        changed = {k for k in a if not torch.equal(a[k], b[k])}
        assert changed == ({CONTEXT_KEY, POOLED_KEY} if name == "transformer" else set()), (name, changed)
    tensors, meta = read_erasure((root / "final" / "erasure.safetensors").read_bytes())
    assert meta["component"] == "transformer" and set(tensors) == {CONTEXT_KEY, POOLED_KEY}
    state = out.transformer.state_dict()
    assert all(torch.equal(tensors[k], state[k]) for k in tensors)
    (lora_file, *_) = sorted((root / "concepts").glob("*/lora.safetensors"))
    from safetensors import safe_open

    with safe_open(str(lora_file), "pt") as f:
        a = f.get_tensor("transformer.context_embedder.lora_A.weight")
    assert a.shape[1] == src.transformer.config.joint_attention_dim
    lora = LoraFactors.from_bytes(lora_file.read_bytes())
    assert lora.factors[CONTEXT_KEY][0].shape[1] > a.shape[1]  # padded again for the closed forms
    # Applying the erasure file: into a loaded source pipeline, and as `mace-ray apply` writes it.
    from mace_core.checkpoints import apply_erasure
    from mace_ray.erase.apply import apply_erasure_file

    apply_erasure(src, (root / "final" / "erasure.safetensors").read_bytes())
    applied = src.transformer.state_dict()
    assert all(torch.equal(applied[k], state[k]) for k in state)
    folder_out = root.parent.parent / "applied"
    apply_erasure_file(root / "final" / "erasure.safetensors", folder_out, model=str(folder))
    again = pipeline_cls.from_pretrained(folder_out).transformer.state_dict()
    assert all(torch.equal(again[k], state[k]) for k in state)
    # diffusers loads the concept's LoRA onto the transformer's context_embedder as it is.
    before = out.transformer.context_embedder.weight.detach().clone()
    out.load_lora_weights(str(lora_file))
    out.fuse_lora()
    A, B = lora.layer_factors(CONTEXT_KEY)
    assert B.any() and torch.allclose(out.transformer.context_embedder.weight - before, B @ A, atol=1e-6)


def check_images(family, pipe) -> None:
    """Generation through the family: per-seed images, independent of the batch."""
    both = family.generate(pipe, ["a photo of a dog", "a photo of a cat"], [1, 2], 32, 32, 2, 3.5)
    one = family.generate(pipe, ["a photo of a cat"], [2], 32, 32, 2, 3.5)
    assert both.shape == (2, 32, 32, 3) and both.dtype == np.uint8
    assert not np.array_equal(both[0], both[1]) and np.abs(both[1].astype(int) - one[0]).mean() < 1.0


def check_eval_and_audit(root: Path, tmp: Path, attack: str) -> None:
    """`mace-ray eval` (celebrities suite) and `mace-ray audit` (one embedding attack, which
    learns input embeddings in every text encoder of the family) run on the erase run, in this
    process, with the tiny CLIP scorer and the fewest steps."""
    import json

    from typer.testing import CliRunner

    from mace_ray.cli.main import app

    def report(args: list[str]) -> dict:
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 0, r.stderr
        return json.loads(
            (Path(json.loads(r.stdout.strip().splitlines()[-1])["root"]) / "report.json").read_text()
        )

    fast = ["--executor", "local", "--clip", "tiny", "--images", "1", "--inference-steps", "2"]
    rep = report(["eval", str(root), "--suite", "celebrities", "--output", str(tmp / "e"), *fast])
    model = rep["models"]["model"]
    assert rep["status"] == "complete" and model["images"] >= 2 and model["metrics"]["acc_e"] is not None
    steps = ["--inversion-steps", "2", "--inversion-images", "2", "--soft-prompt-steps", "2"]
    rep = report(["audit", str(root), "--output", str(tmp / "a"), "--attacks", attack, *fast, *steps])
    assert rep["status"] == "complete" and rep["attacks"] == [attack]
    for c in rep["concepts"]:
        assert 0 <= c["plain"]["residual"] < 1 and 0 <= c["attacks"][attack]["leak"] <= 1, c


class MMDiTFamilyTests:
    """The tests every MMDiT family runs alike: probes and LoRA training, and the erase runs.
    Its test module collects them through a subclass ``TestMMDiTFamily`` that names the
    ``family`` and the audit's embedding ``attack``, and provides the ``model_folder`` and
    ``pipe`` fixtures (tests/family_fixtures.py). One local erase run (``local_run``,
    module-scoped) serves the erase tests."""

    family: ClassVar[ModelFamily]
    attack: ClassVar[str]

    def test_probes_and_lora_training(self, pipe):
        enc = self.family.prompt_encoder(self.family.text_components(pipe), CPU)
        check_probes_and_training(enc, pipe, self.family.training_schedule(pipe))

    @pytest.fixture(scope="module")
    def local_run(self, model_folder, tmp_path_factory) -> dict:
        tmp = tmp_path_factory.mktemp(f"{self.family.name}-run")
        return erase(str(model_folder), str(tmp / "out"), tmp, executor="local")

    @pytest.fixture(scope="module")
    def half_run(self, model_folder, tmp_path_factory) -> dict:
        """``local_run`` as a GPU worker runs it under ``--precision auto`` (forced here on the
        CPU): the transformer held in bf16, generation and training under bf16 autocast."""
        tmp = tmp_path_factory.mktemp(f"{self.family.name}-half-run")
        with pytest.MonkeyPatch.context() as m:
            m.setattr(ConceptBatchWorker, "mixed_precision", property(gpu_precision))
            return erase(str(model_folder), str(tmp / "out"), tmp, executor="local")

    def test_default_erase_is_as_strong_as_sd1(self, local_run):
        check_strength(local_run)

    def test_a_gpu_holds_the_transformer_in_bf16_and_the_closed_forms_stay_fp32(self, pipe, monkeypatch):
        """Under --precision auto on a GPU the denoiser's frozen weights are bf16 (FLUX.1-dev's
        would not fit an 80 GB GPU in fp32) while the text encoders and the VAE stay fp32;
        the original weights the closed forms take are the fp32 ones, and a LoRA trains in
        fp32 on the bf16 transformer."""
        import copy

        from mace_core.models import pipeline_projections

        held = copy.deepcopy(pipe)
        original = pipeline_projections(held).weights()
        monkeypatch.setattr(ConceptBatchWorker, "mixed_precision", property(gpu_precision))
        worker = ConceptBatchWorker(held, DEFAULTS, CPU, original, original)
        assert {p.dtype for p in held.transformer.parameters()} == {torch.bfloat16}
        parts = held.components.items()
        others = [m for n, m in parts if isinstance(m, torch.nn.Module) and n != "transformer"]
        assert {p.dtype for m in others for p in m.parameters()} == {torch.float32}
        fp32 = pipeline_projections(pipe).weights()
        assert all(w.dtype == torch.float32 and torch.equal(w, fp32[k]) for k, w in original.items())
        # The module holds W rounded to bf16; the closed forms are handed W itself.
        now = pipeline_projections(held).weights()
        assert all(torch.equal(now[k], w.bfloat16().float()) for k, w in original.items())
        (art,) = worker.finish(worker.data([CLINTON]))
        assert art.images.dtype == np.uint8 and len(art.losses) == 10 and np.isfinite(art.losses).all()
        assert {t.dtype for ab in art.lora.factors.values() for t in ab} == {torch.float32}

    def test_gpu_precision_erases_as_strongly(self, model_folder, local_run, half_run):
        """The same erase with the GPU's precision: CFR is the same (fp32 statistics and W);
        the fusion takes LoRAs trained under bf16, and erases as strongly; the output is the
        source's files (fp32) with only the declared projections changed, nothing cast."""
        import diffusers

        check_strength(half_run)
        pipeline_cls = getattr(diffusers, self.family.pipeline_class)
        check_output(pipeline_cls, model_folder, Path(half_run["output"]["root"]))
        full, half = local_run["erasure"], half_run["erasure"]
        assert half["residual_cfr"]["pooled"] == pytest.approx(full["residual_cfr"]["pooled"], abs=1e-6)
        assert half["prior_drift_cfr"] == pytest.approx(full["prior_drift_cfr"], abs=1e-6)
        assert half["residual"]["pooled"] == pytest.approx(full["residual"]["pooled"], abs=0.02)
        assert half["prior_drift"] == pytest.approx(full["prior_drift"], abs=0.01)

    def test_output_loads_and_differs_only_in_the_declared_projections(self, model_folder, local_run):
        import diffusers

        # The family's pipeline class: FluxPipeline, StableDiffusion3Pipeline.
        check_output(
            getattr(diffusers, self.family.pipeline_class), model_folder, Path(local_run["output"]["root"])
        )

    def test_eval_and_audit_run_on_the_erased_model(self, local_run, tmp_path):
        check_eval_and_audit(Path(local_run["output"]["root"]), tmp_path, self.attack)

    def test_erase_through_ray_from_and_to_s3(
        self, aws_env, bucket, model_folder, local_run, tmp_path, monkeypatch
    ):
        """The model read from s3:// (the driver fetches only the text side), the run written to
        s3://, the LoRAs trained by Ray workers: the local run's erasure."""
        from helpers import assert_same_erasure, small_local_ray

        from mace_core.checkpoints import read_erasure
        from mace_ray.storage.s3 import S3Storage

        monkeypatch.setenv("MACE_MODEL_CACHE", str(tmp_path / "models"))
        S3Storage(f"s3://{bucket}/models", aws_env.endpoint).put_dir(model_folder, model_folder.name)
        with small_local_ray(num_gpus=1):
            rep = erase(
                f"s3://{bucket}/models/{model_folder.name}",
                f"s3://{bucket}/runs-out",
                tmp_path,
                s3_endpoint=aws_env.endpoint,
                workers=1,
                gpus_per_worker=1,
            )
        assert rep["executor"] == "ray"
        out = S3Storage(f"s3://{bucket}/runs-out", aws_env.endpoint)
        got = read_erasure(out.read_bytes(f"runs/{rep['run_id']}/final/erasure.safetensors"))[0]
        root = Path(local_run["output"]["root"])
        assert_same_erasure(
            got, read_erasure((root / "final" / "erasure.safetensors").read_bytes())[0], atol=1e-5
        )
