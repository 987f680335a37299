"""`mace-ray erase` and `mace-ray eval` are built from the request dataclasses
(mace_ray/engine/requests.py, mace_ray/cli/build.py): help sections and choices, one-line
errors, --config keys, shared options, every field reachable, the version, unchanged run ids."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml
from helpers import settings_fields
from typer.testing import CliRunner

from mace_core.concepts import ConceptType
from mace_core.options import Group, Internal, Option, internal, option
from mace_core.settings import (
    ClosedFormSettings,
    DataSettings,
    EraseSettings,
    LoraInit,
    Masker,
    MaskSettings,
    Precision,
    TrainSettings,
)
from mace_ray.cli.build import params_of
from mace_ray.cli.main import app
from mace_ray.engine.requests import Executor
from mace_ray.erase.request import EraseRequest, Method
from mace_ray.eval.request import EvalRequest, SuiteName

WIDE = {"COLUMNS": "250"}  # --help wraps at the terminal width (80 at most)


def invoke(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(app, list(args), env=env)


@pytest.fixture
def captured(monkeypatch) -> dict:
    """The request each command would run (the jobs themselves replaced)."""
    import mace_core.evaluation.summary as summary
    import mace_ray.erase.driver as erase_mod
    import mace_ray.eval.driver as evaluate_mod

    seen: dict = {}

    def fake_erase(req):
        seen["erase"] = req
        return {"run_id": "x", "status": "complete", "output": {}}

    def fake_eval(req):
        seen["eval"] = req
        return {"eval_id": "e", "status": "complete", "output": {"root": "r"}}

    monkeypatch.setattr(erase_mod, "run_erase", fake_erase)
    monkeypatch.setattr(evaluate_mod, "run_eval", fake_eval)
    monkeypatch.setattr(summary, "metrics_table", lambda report: "metrics")
    return seen


def test_erase_help_has_panels_and_the_choices():
    r = invoke("erase", "--help-all", env=WIDE)
    assert r.exit_code == 0, r.output
    panels = ["Model and output", "Data (images and masks)", "Training (LoRA)", "Closed forms"]
    panels += ["Cluster and devices", "Run control"]
    at = [r.stdout.index(f"\n{p}:\n") for p in panels]
    assert at == sorted(at)  # in Panel's order
    for choices in ("[grounded-sam|segment-anything|whole-image]", "[auto|fp32]", "[ray|local]"):
        assert choices in r.stdout, choices
    assert "[gaussian|kaiming]" in r.stdout and "[object|celebrity|style|explicit]" in r.stdout
    assert "[mace|cfr]" in r.stdout  # --method
    # --concepts-per-batch, --prompts-per-concept: a number or a word
    assert "--concepts-per-batch INTEGER|auto" in r.stdout and "--prompts-per-concept INTEGER|all" in r.stdout
    # Each option sits in its field's panel: --seed with training, --masker with the data.
    training = r.stdout[r.stdout.index("\nTraining (LoRA):\n") : r.stdout.index("\nClosed forms:\n")]
    assert "--seed" in training and "--masker" not in training and "--lora-init" in training
    # Flags are flags: no value shown, one spelling (the one that turns the default around).
    for flag in ("--squared-loss", "--no-penalize-eot", "--no-cfr-scale-squared", "--quiet", "--no-resume"):
        assert f"  {flag}  " in r.stdout, flag
    assert "--penalize-eot" not in r.stdout and "--verbose" not in r.stdout and "--resume " not in r.stdout


def test_eval_help_uses_the_names_erase_uses():
    r = invoke("eval", "--help-all", env=WIDE)
    assert r.exit_code == 0, r.output
    for panel in ("Suite", "Generation", "Scoring", "Cluster and devices", "Run control"):
        assert f"\n{panel}:\n" in r.stdout, panel
    assert "[objects|celebrities|styles|explicit|coco]" in r.stdout and "[auto|fp32]" in r.stdout
    for name in ("--images ", "--precision", "--inference-steps", "--seed ", "--workers", "--executor"):
        assert name in r.stdout, name
    assert "--images-per-prompt" not in r.stdout and "--fp16" not in r.stdout  # hidden / gone


@pytest.mark.parametrize(
    ("args", "option", "value"),
    [
        (["erase", "{c}", "--masker", "sam2"], "--masker", "sam2"),
        (["erase", "{c}", "--precision", "fp16"], "--precision", "fp16"),
        (["erase", "{c}", "--executor", "spark"], "--executor", "spark"),
        (["erase", "{c}", "--lora-init", "xavier"], "--lora-init", "xavier"),
        (["eval", "tiny", "--suite", "mnist"], "--suite", "mnist"),
        (["eval", "tiny", "--suite", "objects", "--precision", "half"], "--precision", "half"),
        (["eval", "tiny", "--suite", "objects", "--executor", "spark"], "--executor", "spark"),
        (["cache-prior", "{c}", "--executor", "spark"], "--executor", "spark"),
        (["erase", "{c}", "--images", "0"], "--images", "greater than or equal to 1"),
        (["erase", "{c}", "--box-threshold", "2"], "--box-threshold", "less than or equal to 1"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_option(tmp_path, captured, args, option, value):
    concepts = tmp_path / "c.txt"
    concepts.write_text("dog\n")
    out = tmp_path / "out"
    r = invoke(*[a.replace("{c}", str(concepts)) for a in args], "--output", str(out))
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith(f"mace-ray: error: Invalid value for '{option}'") and value in lines[0], lines[
        0
    ]
    assert not captured and not out.exists()


# Every erase option, as a --config key (YAML types) and as command-line arguments.
EVERY_ERASE_KEY = {
    "concepts": "c.txt",
    "model": "tiny",
    "output": "some/out",
    "type": "celebrity",
    "prior_captions": "caps.txt",
    "retain": "keep.txt",
    "cfr_prior_weight": 0.5,
    "domain_weight": 2.5,
    "cfr_ridge": 0.01,
    "retain_weight": 3.0,
    "fusion_prior_weight": 0.25,
    "fusion_ridge": 0.02,
    "no_cfr_scale_squared": True,
    "rank": 2,
    "lr": 0.001,
    "train_steps": 9,
    "squared_loss": True,
    "no_penalize_eot": True,
    "seed": 7,
    "lora_init": "kaiming",
    "images": 3,
    "inference_steps": 4,
    "masker": "whole-image",
    "detector": "tiny",
    "segmenter": "tiny",
    "box_threshold": 0.5,
    "text_threshold": 0.4,
    "prompts_per_concept": "all",
    "precision": "fp32",
    "device": "cpu",
    "concepts_per_batch": 3,
    "s3_endpoint": "http://127.0.0.1:1",
    "executor": "local",
    "address": "ray://head:10001",
    "workers": 2,
    "gpus_per_worker": 0.5,
    "placement_wait": 5.0,
    "no_resume": True,
    "max_residual": 0.9,
    "lock_wait": 1.5,
    "stages": "data,train",
    "from": "0123456789abcdef",
    "method": "cfr",
    "quiet": True,
}


def as_arguments(values: dict) -> list[str]:
    """Each key as its option: a flag when its value is a bool (every bool here is true)."""
    args = [str(values["concepts"])]
    for key, v in values.items():
        flag = "--" + key.replace("_", "-")
        if key == "concepts":
            continue
        args += [flag] if isinstance(v, bool) else [flag, str(v)]
    return args


def test_a_config_with_every_key_is_the_same_request_as_the_command_line(tmp_path, captured):
    assert set(EVERY_ERASE_KEY) == {p.name.replace("-", "_") for p in params_of(EraseRequest)}
    r = invoke("erase", *as_arguments(EVERY_ERASE_KEY))
    assert r.exit_code == 0, r.output
    from_cli = captured.pop("erase")
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump(EVERY_ERASE_KEY))
    r = invoke("erase", "--config", str(cfg))
    assert r.exit_code == 0, r.output
    assert captured["erase"] == from_cli

    s = from_cli.settings
    assert from_cli.default_type is ConceptType.CELEBRITY and from_cli.executor is Executor.LOCAL
    assert from_cli.method is Method.CFR
    assert s.masks.masker is Masker.WHOLE_IMAGE and s.precision is Precision.FP32
    assert s.train.lora_init is LoraInit.KAIMING
    assert s.train.seed == s.data.seed == 7  # --seed feeds both
    assert s.cfr == ClosedFormSettings(prior_weight=0.5, domain_weight=2.5, ridge=0.01, retain_weight=3.0)
    assert s.fusion == ClosedFormSettings(prior_weight=0.25, domain_weight=2.5, ridge=0.02, retain_weight=3.0)
    assert s.prompts_per_concept is None and from_cli.concepts_per_batch == 3  # "all", a number
    assert (from_cli.progress, from_cli.resume, s.cfr_scale_squared, s.train.penalize_eot) == (False,) * 4
    assert s.train.squared_loss is True and from_cli.lock_wait_s == 1.5 and from_cli.placement_wait_s == 5.0
    assert (from_cli.concept_file, from_cli.retain_file, from_cli.prior_captions) == (
        "c.txt",
        "keep.txt",
        "caps.txt",
    )
    # The command line still wins over the file.
    r = invoke("erase", "--config", str(cfg), "--seed", "8", "--masker", "grounded-sam")
    assert r.exit_code == 0, r.output
    s = captured["erase"].settings
    assert s.train.seed == s.data.seed == 8 and s.masks.masker is Masker.GROUNDED_SAM


def test_defaults_are_the_dataclasses_defaults(captured):
    r = invoke("erase", "c.txt")
    assert r.exit_code == 0, r.output
    assert captured["erase"] == EraseRequest(concept_file="c.txt")
    r = invoke("eval", "tiny", "--suite", "objects")
    assert r.exit_code == 0, r.output
    assert captured["eval"] == EvalRequest(model="tiny", suite=SuiteName.OBJECTS)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("masker: sam2\n", "masker: Invalid value for '--masker'"),
        ("concepts_per_batch: 0\n", "--concepts-per-batch: expected a positive integer or auto, got '0'"),
        ("images: true\n", "images: true is for switches; this option takes a value"),  # not 1
    ],
)
def test_a_bad_config_value_is_one_line(tmp_path, captured, text, needle):
    cfg = tmp_path / "job.yaml"
    cfg.write_text("concepts: c.txt\n" + text)
    r = invoke("erase", "--config", str(cfg))
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1 and needle in lines[0], r.stderr
    assert not captured


def test_eval_options_and_the_old_images_spelling(captured):
    r = invoke(
        "eval", "tiny", "--suite", "celebrities", "--images", "3", "--precision", "auto", "--seed", "4"
    )
    assert r.exit_code == 0, r.output
    req = captured["eval"]
    assert req.images_per_prompt == 3 and req.generation.precision is Precision.AUTO and req.seed == 4
    r = invoke(
        "eval", "tiny", "--suite", "objects", "--images-per-prompt", "5", "--seeds", "1", "--seeds", "2"
    )
    assert r.exit_code == 2 and "give --seeds or --images, not both" in r.stderr  # the alias feeds --images
    r = invoke("eval", "tiny", "--suite", "objects", "--images-per-prompt", "5")
    assert r.exit_code == 0 and captured["eval"].images_per_prompt == 5
    # The old spelling is another name of --images: the later one given wins.
    r = invoke("eval", "tiny", "--suite", "objects", "--images", "2", "--images-per-prompt", "5")
    assert r.exit_code == 0 and captured["eval"].images_per_prompt == 5
    r = invoke("eval", "tiny", "--suite", "objects", "--seeds", "1", "--seeds", "2")
    assert r.exit_code == 0 and captured["eval"].seeds == (1, 2)


@pytest.mark.parametrize("root", [EraseRequest, EvalRequest])
def test_every_field_is_an_option_or_marked_internal(root):
    """A settings field added without command-line metadata fails here (and the builder)."""
    fed = {".".join(t) for p in params_of(root) for t in p.targets}
    for where, meta in settings_fields(root):
        assert isinstance(meta, Option | Group | Internal), f"{where} has no command-line metadata"
        if isinstance(meta, Option):
            assert where in fed, where
        if isinstance(meta, Internal):
            assert meta.why.strip(), where
    for p in params_of(root):
        assert p.help and (p.panel or p.option.argument), p.name


def test_the_builder_refuses_a_field_without_metadata_and_an_unshared_clash():
    @dataclasses.dataclass(frozen=True)
    class Unmarked:
        rank: int = dataclasses.field(default=1, metadata=option("Rank."))
        forgotten: int = 0

    with pytest.raises(TypeError, match="Unmarked.forgotten has no command-line metadata"):
        params_of(Unmarked)

    @dataclasses.dataclass(frozen=True)
    class Clash:
        seed: int = dataclasses.field(default=0, metadata=option("Seed."))
        other: int = dataclasses.field(default=0, metadata=option("Other seed.", name="seed"))
        skipped: int = dataclasses.field(default=0, metadata=internal("a test"))

    with pytest.raises(TypeError, match="option --seed already feeds seed"):
        params_of(Clash)


def test_version():
    r = invoke("--version")
    assert r.exit_code == 0 and r.stdout.strip() == version("mace-ray")


def test_settings_serialise_as_before_so_run_ids_stay():
    """report.json's settings and the run id hash EraseSettings.to_dict(): choices as plain
    strings, the same JSON as when they were str fields (hashes from before the enums)."""

    def digest(s: EraseSettings) -> str:
        return hashlib.sha256(json.dumps(s.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    assert digest(EraseSettings()) == "c97b7b956e3e4e2c"
    other = EraseSettings(
        cfr=ClosedFormSettings(1.0, 2.0, 0.1, 3.0),
        train=TrainSettings(rank=2, lora_init="kaiming", seed=5, lr=1e-3, steps=9),
        data=DataSettings(images_per_concept=3, seed=5),
        masks=MaskSettings(masker="whole-image", detector="tiny"),
        precision="fp32",
        prompts_per_concept=None,
        cfr_scale_squared=False,
    )
    assert digest(other) == "c621bc711a353256"
    d = other.to_dict()
    assert type(d["masks"]["masker"]) is str and type(d["precision"]) is str  # noqa: E721
    # Strings and members make the same settings.
    assert other.masks == MaskSettings(masker=Masker.WHOLE_IMAGE, detector="tiny")
    with pytest.raises(ValueError, match=r"unknown precision 'fp16' \(valid: auto, fp32\)"):
        EraseSettings(precision="fp16")


def test_the_jobs_configs_are_valid_erase_configs(captured):
    """The shipped jobs/*/job.yaml files use option names the command still has."""
    jobs = sorted(Path(__file__).resolve().parents[1].glob("jobs/*/job.yaml"))
    assert jobs
    for job in jobs:
        if "concepts" in yaml.safe_load(job.read_text()):
            r = invoke("erase", "--config", str(job))
        else:
            # One class per run (cifar10): the config names no concepts, so the class file is
            # the argument, and a command without one is refused rather than erasing a default.
            refused = invoke("erase", "--config", str(job))
            assert refused.exit_code == 2 and "Missing argument 'CONCEPTS'" in refused.stderr
            r = invoke("erase", str(job.parent / "dog.txt"), "--config", str(job))
        assert r.exit_code == 0, (job, r.stderr)


def test_the_choices_are_the_jobs_own_lists():
    """The suites the command offers are the ones the evaluation knows."""
    from mace_core.evaluation.suites import SUITES

    assert SuiteName.values() == SUITES and Executor.values() == ("ray", "local")


def _settings_classes() -> list[type]:
    from mace_core.audit.attacks.indirect import IndirectSettings
    from mace_core.audit.attacks.inversion import InversionSettings
    from mace_core.audit.attacks.soft_prompt import SoftPromptSettings
    from mace_core.audit.settings import AuditSettings
    from mace_core.evaluation.settings import GenerationSettings

    return [
        ClosedFormSettings,
        TrainSettings,
        DataSettings,
        MaskSettings,
        EraseSettings,
        GenerationSettings,
        AuditSettings,
        IndirectSettings,
        InversionSettings,
        SoftPromptSettings,
    ]


def test_every_declared_bound_holds_for_settings_made_in_code():
    """The min/max a field declares for the command line are checked on the object too (the
    ``Settings`` base), whoever makes it: code, a --config file, a manifest read back."""
    from mace_core.audit.settings import AuditSettings
    from mace_core.errors import SettingError
    from mace_ray.audit.request import AuditRequest

    checked = 0
    for cls in _settings_classes():
        for f in dataclasses.fields(cls):
            o = f.metadata.get("cli")
            if not isinstance(o, Option) or (o.min is None and o.max is None):
                continue
            bad = [o.min - 1] if o.min is not None else []
            bad += [o.max + 1] if o.max is not None else []
            for value in [*bad, float("nan")]:
                with pytest.raises(SettingError, match=rf"^{f.name} must be (>=|<=|in \[)"):
                    cls(**{f.name: value})
            edge = o.min if o.min is not None else o.max
            assert getattr(cls(**{f.name: edge}), f.name) == edge  # the bound itself is allowed
            checked += 1
    assert checked >= 20
    # The requests too: their own bounds and the shared ones of WhereItRuns.
    with pytest.raises(SettingError, match="^workers must be >= 1, got 0$"):
        AuditRequest(model="tiny", workers=0)
    with pytest.raises(SettingError, match="^placement_wait_s must be >= 0, got -1$"):
        EraseRequest(concept_file="c.txt", placement_wait_s=-1)
    with pytest.raises(SettingError, match=r"^success_leak must be in \[0, 1\], got 1.5$"):
        AuditRequest(model="tiny", settings=AuditSettings(success_leak=1.5))
    # Choices: a string becomes its member in every class, a wrong one names the field.
    assert EraseRequest(concept_file="c.txt", method="cfr").method is Method.CFR
    assert EvalRequest(model="tiny", suite="coco", executor="local").executor is Executor.LOCAL
    with pytest.raises(SettingError, match="unknown suite 'cocoa'"):
        EvalRequest(model="tiny", suite="cocoa")
