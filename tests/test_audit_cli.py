"""`mace-ray audit` end to end on the tiny model: in one process with resume, an erase run
through a local Ray (fake GPUs), to S3, and bad input as one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import settings_fields
from PIL import Image
from typer.testing import CliRunner

from mace_core.options import Group, Internal, Option
from mace_ray.audit.request import AuditRequest
from mace_ray.cli.build import params_of
from mace_ray.cli.main import app

# Every attack and images, at the smallest settings that still take steps.
FAST = [
    "--inversion-steps", "3", "--inversion-images", "2", "--soft-prompt-steps", "3",
    "--indirect-misspellings", "1", "--images", "1", "--inference-steps", "2",
]  # fmt: skip


def invoke(*args: str):
    r = CliRunner().invoke(app, ["audit", *args])
    return r.exit_code, r.stdout, r.stderr


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_audit_of_an_unerased_model_in_process_then_resumed(tmp_path):
    concepts = tmp_path / "concepts.txt"
    concepts.write_text("airplane | object | sky | aeroplane | a winged aircraft\n")
    out = tmp_path / "out"
    args = ["tiny", str(concepts), "--original", "tiny", "--executor", "local", "--output", str(out), *FAST]
    code, stdout, stderr = invoke(*args)
    assert code == 0, stderr
    assert "| type | concepts | plain leak | indirect: ASR (mean leak) |" in stdout
    root = Path(last_json(stdout)["root"])
    rep = json.loads((root / "report.json").read_text())
    assert (
        rep["status"] == "complete"
        and rep["executor"] == "local"
        and rep["attacks"]
        == [
            "indirect",
            "inversion",
            "soft-prompt",
        ]
    )
    (entry,) = rep["concepts"]
    # Nothing was erased: the plain prompt and the indirect attack leak fully.
    assert entry["plain"]["leak"] == 1.0 and entry["attacks"]["indirect"]["leak"] == 1.0
    assert entry["attacks"]["indirect"]["residual"] == pytest.approx(1.0, abs=1e-12)
    inv = entry["attacks"]["inversion"]
    assert (
        inv["steps"] == 3
        and inv["details"]["images_from"] == "original model"
        and inv["leak"] > inv["curve"][0]
    )
    assert rep["by_type"]["object"]["indirect"]["success_rate"] == 1.0
    # Image figures exist (tiny CLIP: computed, and said to be meaningless).
    assert entry["images"]["original"]["scorer"] == "clip:tiny" and any(
        "tiny CLIP" in n for n in rep["notes"]
    )
    slug = entry["slug"]
    for what in ("original", "erased", "indirect", "inversion", "soft-prompt"):
        assert (root / "images" / slug / what / "000.png").is_file(), what
    assert (root / "jobs" / slug / "inversion.safetensors").is_file()
    assert not (root / "jobs" / slug / "indirect.safetensors").exists()  # words only
    summary = (root / "summary.md").read_text()
    assert (
        "## Attack success rate per concept type" in summary and "![curves.png](plots/curves.png)" in summary
    )
    for name in rep["output"]["plots"]:
        with Image.open(root / "plots" / name) as im:
            im.load()

    # The same command again: every job's marker holds, nothing runs.
    code, stdout, stderr = invoke(*args)
    assert code == 0, stderr
    again = json.loads((root / "report.json").read_text())
    assert again["jobs"] == {"total": 4, "reused": 4} and again["concepts"] == rep["concepts"]
    # A damaged image: only its job runs again, with the same figures.
    (root / "images" / slug / "inversion" / "000.png").write_bytes(b"not a png")
    code, stdout, stderr = invoke(*args)
    assert code == 0, stderr
    third = json.loads((root / "report.json").read_text())
    assert third["jobs"] == {"total": 4, "reused": 3}
    assert third["concepts"][0]["attacks"]["inversion"]["leak"] == inv["leak"]


def test_audit_of_an_erase_run_through_ray(local_ray, erased_run, tmp_path):
    out = tmp_path / "out"
    code, stdout, stderr = invoke(
        str(erased_run), "--output", str(out), "--workers", "2", "--gpus-per-worker", "1", *FAST
    )
    assert code == 0, stderr
    rep = json.loads((Path(last_json(stdout)["root"]) / "report.json").read_text())
    assert (
        rep["executor"] == "ray" and rep["workers"]["size"] == 2 and rep["workers"]["resources"]["gpus"] == 1
    )
    # The run named the original model, the concepts and where its images are.
    assert rep["original"] == "tiny" and rep["model"]["erase_run"] == erased_run.name
    (entry,) = rep["concepts"]
    assert entry["concept"]["text"] == "airplane"
    assert entry["attacks"]["inversion"]["details"]["images_from"] == "erase run"
    assert entry["plain"]["leak"] < 1.0  # the erasure took something
    for a in ("indirect", "soft-prompt"):  # both start from the plain prompt
        assert entry["attacks"][a]["leak"] >= entry["plain"]["leak"]


def test_audit_writes_to_s3_and_resumes_from_it(aws_env, bucket, tmp_path):
    from mace_ray.storage.open_store import open_storage

    concepts = tmp_path / "c.txt"
    concepts.write_text("airplane | object | sky | aeroplane\n")
    url = f"s3://{bucket}/mace"
    args = ["tiny", str(concepts), "--original", "tiny", "--executor", "local", "--output", url]
    args += ["--s3-endpoint", aws_env.endpoint]
    args += ["--attacks", "indirect,soft-prompt", "--soft-prompt-steps", "2", "--images", "0"]
    code, stdout, stderr = invoke(*args)
    assert code == 0, stderr
    root = last_json(stdout)["root"]
    assert root.startswith(f"{url}/audits/")
    storage = open_storage(url, s3_endpoint=aws_env.endpoint)
    key = root[len(url) + 1 :]
    rep = json.loads(storage.read_bytes(f"{key}/report.json"))
    assert rep["attacks"] == ["indirect", "soft-prompt"] and storage.exists(f"{key}/summary.md")
    assert rep["concepts"][0]["attacks"]["indirect"]["images"] == {
        "leak_rate": None,
        "unavailable": "--images 0",
    }
    code, stdout, stderr = invoke(*args)
    assert code == 0, stderr
    assert json.loads(storage.read_bytes(f"{key}/report.json"))["jobs"] == {"total": 3, "reused": 3}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{tmp}/no-such-run"], "model '{tmp}/no-such-run': no such folder"),
        (
            ["tiny", "{c}", "--attacks", "indirect,pez"],
            "--attacks: unknown attack 'pez' (valid: all, indirect",
        ),
        (
            ["tiny", "{c}", "--attacks", "all,indirect"],
            "--attacks: 'all' stands alone, not in a list (valid: all,",
        ),
        (["tiny", "{c}"], "--original MODEL is required"),
        (["tiny", "--original", "tiny"], "give a concept file (CONCEPTS)"),
        (
            ["tiny", "{tmp}/missing.txt", "--original", "tiny"],
            "concept file '{tmp}/missing.txt' does not exist",
        ),
        (["tiny", "{c}", "--original", "tiny", "--inversion-target", "noise"], "--inversion-target"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    concepts = tmp_path / "c.txt"
    concepts.write_text("airplane | object | sky\n")
    out = tmp_path / "out"
    filled = [a.replace("{tmp}", str(tmp_path)).replace("{c}", str(concepts)) for a in args]
    code, _, stderr = invoke(*filled, "--executor", "local", "--output", str(out))
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1, stderr
    assert lines[0].startswith("mace-ray: error: ") and message.replace("{tmp}", str(tmp_path)) in lines[0]
    assert not out.exists()


def test_every_audit_setting_is_an_option():
    """Each attack's settings are options of their own (--<attack>-<field>), from the metadata."""
    fed = {".".join(t) for p in params_of(AuditRequest) for t in p.targets}
    for where, meta in settings_fields(AuditRequest):
        assert isinstance(meta, Option | Group | Internal), where
        if isinstance(meta, Option):
            assert where in fed, where
    names = {p.name for p in params_of(AuditRequest)}
    assert {
        "inversion-steps",
        "inversion-target",
        "soft-prompt-l2",
        "indirect-misspellings",
        "budget",
    } <= names
    r = CliRunner().invoke(app, ["audit", "--help-all"], env={"COLUMNS": "250"})
    assert r.exit_code == 0 and "\nAttacks:\n" in r.stdout and "[teacher|images]" in r.stdout


def test_an_audited_folder_changed_in_place_is_a_new_audit(tiny_model_folder, tmp_path):
    """The audit id (whose finished jobs and images are reused) is keyed by the models'
    content, not their paths: an erased folder rewritten in place is audited anew."""
    import shutil

    from safetensors.torch import load_file, save_file

    from mace_ray.audit.driver import prepare

    model = tmp_path / "model"
    shutil.copytree(tiny_model_folder, model)
    concepts = tmp_path / "concepts.txt"
    concepts.write_text("airplane | object | sky\n")
    req = AuditRequest(model=str(model), concept_file=str(concepts), original="tiny", output=str(tmp_path))
    first = prepare(req).audit_id
    assert prepare(req).audit_id == first
    unet = model / "unet" / "diffusion_pytorch_model.safetensors"
    weights = load_file(unet)
    weights["conv_in.weight"] = weights["conv_in.weight"] + 0.25
    save_file(weights, unet)
    assert prepare(req).audit_id != first


def test_concepts_the_run_did_not_erase_are_noted(erased_run, tmp_path, caplog):
    """A concept file may name concepts the erase run left alone (a bystander's leak is a
    baseline), but the report and the log say which: "erased" would mislead."""
    from mace_ray.audit.driver import prepare
    from mace_ray.audit.request import AuditRequest

    cfile = tmp_path / "c.txt"
    cfile.write_text("Airplane | object | sky\ncat | object | a room\n")
    with caplog.at_level("WARNING", logger="mace_ray"):
        p = prepare(AuditRequest(model=str(erased_run), concept_file=str(cfile), output=str(tmp_path / "o")))
    assert [n for n in p.notes if "did not erase" in n] == ["1 concept(s) the erase run did not erase: cat"]
    assert "did not erase: cat" in caplog.text
