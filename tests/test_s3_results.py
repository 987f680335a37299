"""Results where they are: every command reads a run written to s3:// as it reads a local copy
of it (apply, eval, audit, status, pull, gc, erase --from), through one resolver whose cache
is keyed by content and verified; a URL never loses its slash; preparing a run opens the
output once and reads inputs under it through its client.

One tiny erase to S3 (one concept, the tests' cheap settings, in process) serves the module;
its local copy is the whole output prefix, downloaded object by object.
"""

from __future__ import annotations

import dataclasses
import filecmp
import json
import uuid
from pathlib import Path

import botocore.session
import pytest
from helpers import tiny_settings
from typer.testing import CliRunner

from mace_core.concepts import ConceptType
from mace_core.errors import ArtefactError, MaceError, ModelLoadError
from mace_core.settings import MaskSettings
from mace_core.source_folder import model_fingerprint
from mace_ray.cli.main import app
from mace_ray.erase.layout import RunLayout
from mace_ray.erase.request import EraseRequest
from mace_ray.storage import model_cache
from mace_ray.storage.model_cache import split_run
from mace_ray.storage.open_store import open_storage
from mace_ray.storage.resolve import Sources

# The smallest erase that still makes every output (images, a LoRA, the final files).
SETTINGS = tiny_settings(train_steps=2, inference_steps=2, prompts=2)


@pytest.fixture(scope="module")
def s3env(s3_server, tmp_path_factory):
    """The server's credentials only, and a model cache of the module's own."""
    with pytest.MonkeyPatch.context() as mp:
        import os

        for k in list(os.environ):
            if k.startswith(("AWS_", "MACE_S3_")):
                mp.delenv(k)
        for k, v in s3_server.env().items():
            mp.setenv(k, v)
        mp.setenv("MACE_MODEL_CACHE", str(tmp_path_factory.mktemp("model-cache")))
        yield s3_server


@dataclasses.dataclass(frozen=True)
class S3Run:
    endpoint: str
    bucket: str
    root: str  # s3://bucket/out
    run_id: str
    local: Path  # a local copy of the whole output (runs/, data/, cache/)

    @property
    def url(self) -> str:
        return f"{self.root}/runs/{self.run_id}"

    @property
    def local_run(self) -> Path:
        return self.local / "runs" / self.run_id


@pytest.fixture(scope="module")
def s3_run(s3env, tmp_path_factory) -> S3Run:
    from mace_ray.erase.driver import run_erase

    tmp = tmp_path_factory.mktemp("s3run")
    bucket = s3env.create_bucket(f"t-{uuid.uuid4().hex[:12]}")
    root = f"s3://{bucket}/out"
    cfile = tmp / "concepts.txt"
    cfile.write_text("airplane | object | sky\n")
    req = EraseRequest(
        concept_file=str(cfile),
        model="tiny",
        output=root,
        default_type=ConceptType.OBJECT,
        settings=SETTINGS,
        executor="local",
        s3_endpoint=s3env.endpoint,
    )
    rep = run_erase(req)
    storage = open_storage(root, s3_endpoint=s3env.endpoint)
    local = tmp / "copy"
    for prefix in ("runs", "data", "cache"):
        for key in storage.list(prefix):
            (local / key).parent.mkdir(parents=True, exist_ok=True)
            (local / key).write_bytes(storage.read_bytes(key))
    return S3Run(s3env.endpoint, bucket, root, rep["run_id"], local)


def invoke(*args: str):
    r = CliRunner().invoke(app, list(args))
    return r.exit_code, r.stdout, r.stderr


def one_line_error(args: list[str], needle: str) -> str:
    code, stdout, stderr = invoke(*args)
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and needle in lines[0], (code, stdout, stderr)
    return lines[0]


def same_tree(a: Path, b: Path) -> None:
    files_a = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file())
    assert files_a == files_b and files_a
    _, mismatch, errors = filecmp.cmpfiles(a, b, files_a, shallow=False)
    assert not mismatch and not errors, (mismatch, errors)


def test_the_run_layout_and_the_resolver_agree():
    layout = RunLayout("0123456789abcdef")
    assert split_run(layout.root) == ("", "0123456789abcdef", "")
    assert split_run(f"s3://b/p/{layout.erasure}") == (
        "s3://b/p",
        "0123456789abcdef",
        "final/erasure.safetensors",
    )
    assert split_run(f"/x/{layout.final_pipeline}/") == ("/x", "0123456789abcdef", "final/pipeline")
    assert split_run("s3://b/p/runs/abc") is None


def test_apply_from_s3_is_byte_equal_to_apply_from_a_local_copy(s3_run, tmp_path):
    url = f"{s3_run.url}/final/erasure.safetensors"
    ep = ["--s3-endpoint", s3_run.endpoint]
    code, stdout, stderr = invoke("apply", url, "--output", str(tmp_path / "from-s3"), *ep)
    assert code == 0, stderr
    code, _, stderr = invoke("apply", str(s3_run.local_run / "final/erasure.safetensors"), "--output",
                             str(tmp_path / "from-copy"))  # fmt: skip
    assert code == 0, stderr
    same_tree(tmp_path / "from-s3", tmp_path / "from-copy")
    # ... and carries the run's own erased weights (the same source plus the same diff).
    same_tree(tmp_path / "from-s3/unet", s3_run.local_run / "final/pipeline/unet")
    # A run's folder stands for its erasure file; an s3:// --output gets the folder, committed.
    code, stdout, stderr = invoke("apply", s3_run.url, "--output", f"{s3_run.root}/applied", *ep)
    assert code == 0, stderr
    assert stdout.strip() == f"{s3_run.root}/applied"  # the URL as given: both slashes
    storage = open_storage(s3_run.root, s3_endpoint=s3_run.endpoint)
    storage.get_dir("applied", tmp_path / "uploaded")
    same_tree(tmp_path / "uploaded", tmp_path / "from-copy")
    one_line_error(["apply", s3_run.url, "--output", f"{s3_run.root}/applied", *ep], "exists")
    # A missing object is named by its URL, never by a path that lost a slash.
    line = one_line_error(
        ["apply", f"s3://{s3_run.bucket}/nowhere/erasure.safetensors", "--output", str(tmp_path / "x"), *ep],
        f"'s3://{s3_run.bucket}/nowhere/erasure.safetensors'",
    )
    assert "s3:/" + s3_run.bucket not in line


def test_remote_files_are_fetched_once_per_content_and_verified(s3_run, tmp_path, monkeypatch):
    storage = open_storage(f"s3://{s3_run.bucket}", s3_endpoint=s3_run.endpoint)
    erasure = (s3_run.local_run / "final/erasure.safetensors").read_bytes()
    cfr = (s3_run.local_run / "final/cfr.safetensors").read_bytes()
    sources = Sources(s3_run.endpoint, cache_dir=tmp_path / "cache")
    fetches = []
    real = model_cache.S3Storage.get_files
    monkeypatch.setattr(model_cache.S3Storage, "get_files", lambda s, f: (fetches.append(f), real(s, f))[1])
    storage.write_bytes("loose/e.safetensors", erasure)
    url = f"s3://{s3_run.bucket}/loose/e.safetensors"
    first = sources.file(url, "erasure file")
    assert Path(first).read_bytes() == erasure and Path(first).name == "e.safetensors"
    assert sources.file(url, "erasure file") == first and len(fetches) == 1  # the second use: no download
    storage.write_bytes("loose/e.safetensors", cfr)  # the same URL, changed: never the stale copy
    second = sources.file(url, "erasure file")
    assert second != first and Path(second).read_bytes() == cfr and len(fetches) == 2
    # Inside a complete run, a file is checked against the SHA-256 its run recorded.
    fake = "fedcba9876543210"
    storage.write_bytes(f"out/runs/{fake}/final/erasure.safetensors", erasure)
    storage.write_bytes(
        f"out/runs/{fake}/manifest.json",
        json.dumps(
            {"status": "complete", "outputs": {f"runs/{fake}/final/erasure.safetensors": "0" * 64}}
        ).encode(),
    )
    with pytest.raises(ArtefactError, match="does not match the SHA-256 its run recorded"):
        sources.file(f"{s3_run.root}/runs/{fake}/final/erasure.safetensors", "erasure file")
    assert not any((tmp_path / "cache").glob(".*"))  # nothing half-fetched left behind


def test_a_run_pipeline_is_fetched_once_verified_and_fingerprinted_by_content(s3_run, tmp_path, monkeypatch):
    url = f"{s3_run.url}/final/pipeline"
    local = s3_run.local_run / "final/pipeline"
    # The fingerprint of the remote folder is its content's (the run's checksums), so the
    # images and eval/audit ids of the S3 run are those of any copy of it.
    assert Sources(s3_run.endpoint).fingerprint(url) == model_fingerprint(str(local))
    gets = []
    real = model_cache.S3Storage.get_dir
    monkeypatch.setattr(
        model_cache.S3Storage, "get_dir", lambda self, *a: (gets.append(a[0]), real(self, *a))[1]
    )
    first = Sources(s3_run.endpoint, cache_dir=tmp_path / "cache").pipeline(url)
    assert Sources(s3_run.endpoint, cache_dir=tmp_path / "cache").pipeline(url) == first
    assert len(gets) == 1
    same_tree(Path(first), local)
    # eval and audit take the run's folder or its final/pipeline, and read its manifest on S3.
    from mace_ray.eval.driver import locate_model

    sources = Sources(s3_run.endpoint)
    for spec in (s3_run.url, url, url + "/"):
        resolved = locate_model(spec, sources=sources)
        assert resolved.load == url and resolved.manifest["run_id"] == s3_run.run_id, spec
    with pytest.raises(ModelLoadError, match="no such folder"):
        locate_model(f"s3://{s3_run.bucket}/nowhere/model", sources=sources)


def test_eval_of_the_s3_run_equals_eval_of_its_local_copy(s3_run, tmp_path):
    csv = tmp_path / "captions.csv"
    csv.write_text("image_id,caption\n0,a photo of a red bus\n1,an airplane over a field\n")
    # No --clip: the run's base model, read from its manifest on S3, is tiny, so is the CLIP.
    args = ["--suite", "coco", "--prompts-csv", str(csv), "--executor", "local"]
    args += ["--inference-steps", "2", "--images", "1"]
    reports = {}
    for name, model in (("s3", s3_run.url), ("copy", str(s3_run.local_run))):
        out = tmp_path / name
        code, stdout, stderr = invoke(
            "eval", model, "--output", str(out), "--s3-endpoint", s3_run.endpoint, *args
        )
        assert code == 0, stderr
        reports[name] = json.loads(
            (Path(json.loads(stdout.strip().splitlines()[-1])["root"]) / "report.json").read_text()
        )
    a, b = reports["s3"], reports["copy"]
    assert a["eval_id"] == b["eval_id"] and a["scorers"] == b["scorers"]
    ma, mb = a["models"]["model"], b["models"]["model"]
    assert ma["model_id"] == mb["model_id"] and ma["images"] == mb["images"] == 2
    assert ma["metrics"].keys() == mb["metrics"].keys()
    for k, v in ma["metrics"].items():
        assert v == pytest.approx(mb["metrics"][k], abs=1e-6), k
    pngs = {
        n: sorted((tmp_path / n / reports[n]["models"]["model"]["images_prefix"]).glob("*.png"))
        for n in reports
    }
    assert [p.read_bytes() for p in pngs["s3"]] == [p.read_bytes() for p in pngs["copy"]]


def test_audit_of_the_s3_run_equals_audit_of_its_local_copy(s3_run, tmp_path):
    args = ["--attacks", "inversion", "--inversion-steps", "1", "--inversion-images", "1"]
    args += ["--images", "0", "--executor", "local"]
    reports = {}
    for name, model in (("s3", s3_run.url), ("copy", str(s3_run.local_run))):
        code, stdout, stderr = invoke("audit", model, "--output", str(tmp_path / name),
                                      "--s3-endpoint", s3_run.endpoint, *args)  # fmt: skip
        assert code == 0, stderr
        reports[name] = json.loads(
            (Path(json.loads(stdout.strip().splitlines()[-1])["root"]) / "report.json").read_text()
        )
    a, b = reports["s3"], reports["copy"]
    assert (
        a["audit_id"] == b["audit_id"] and a["model"]["erase_run"] == b["model"]["erase_run"] == s3_run.run_id
    )
    (ca,), (cb,) = a["concepts"], b["concepts"]
    # The inversion trained on the run's stored images, read from S3 on one side.
    assert ca["attacks"]["inversion"]["details"]["images_from"] == "erase run"
    assert cb["attacks"]["inversion"]["details"]["images_from"] == "erase run"
    assert ca["plain"]["leak"] == pytest.approx(cb["plain"]["leak"], abs=1e-6)
    assert ca["attacks"]["inversion"]["leak"] == pytest.approx(cb["attacks"]["inversion"]["leak"], abs=1e-6)


def test_status_and_gc_take_the_run_by_its_folder(s3_run):
    ep = ["--s3-endpoint", s3_run.endpoint]
    shown = {}
    for name, args in (
        ("url", [s3_run.url]),
        ("id", [s3_run.run_id, "--output", s3_run.root]),
        ("copy", [str(s3_run.local_run)]),
    ):
        code, stdout, stderr = invoke("status", *args, *ep)
        assert code == 0, stderr
        shown[name] = json.loads(stdout)
    assert shown["url"]["location"] == shown["id"]["location"] == s3_run.url  # both slashes
    assert shown["copy"]["location"] == str(s3_run.local_run)
    strip = [{k: v for k, v in s.items() if k != "location"} for s in shown.values()]
    assert strip[0] == strip[1] == strip[2] and strip[0]["status"] == "complete"
    one_line_error(["status", s3_run.url, "--output", "elsewhere", *ep], "not under --output")
    code, stdout, stderr = invoke("gc", "--output", s3_run.url, "--dry-run", *ep)
    assert code == 0, stderr
    assert json.loads(stdout.strip().splitlines()[-1])["output"] == s3_run.root
    assert json.loads(stdout.strip().splitlines()[-1])["data_kept"] == 1


def test_pull_copies_the_run_checked_and_resumes(s3_run, tmp_path):
    dest = tmp_path / "pulled"
    ep = ["--s3-endpoint", s3_run.endpoint]
    code, stdout, stderr = invoke("pull", s3_run.url, str(dest), *ep)
    assert code == 0, stderr
    first = json.loads(stdout)
    slug = next(p.name for p in (s3_run.local_run / "concepts").iterdir())
    final = ["final/pipeline", "final/erasure.safetensors", "final/cfr.safetensors"]
    wanted = [
        *final,
        "report.json",
        "manifest.json",
        f"concepts/{slug}/lora.safetensors",
        f"concepts/{slug}/notes.json",
    ]
    for rel in wanted:
        if (dest / rel).is_dir():
            same_tree(dest / rel, s3_run.local_run / rel)
        else:
            assert (dest / rel).read_bytes() == (s3_run.local_run / rel).read_bytes(), rel
    assert not (dest / f"concepts/{slug}/DONE").exists() and not (dest / "cfr").exists()
    assert first["fetched"] == first["files"] - 1 and first["reused"] == 0  # all but the manifest
    # Resumable: what is there and verified is not fetched again; a damaged file is.
    again = json.loads(invoke("pull", s3_run.url, str(dest), *ep)[1])
    assert again["fetched"] == 0 and again["reused"] == first["fetched"]
    (dest / "final/erasure.safetensors").write_bytes(b"damaged")
    repaired = json.loads(invoke("pull", s3_run.run_id, str(dest), "--output", s3_run.root, *ep)[1])
    assert repaired["fetched"] == 1
    assert (dest / "final/erasure.safetensors").read_bytes() == (
        s3_run.local_run / "final/erasure.safetensors"
    ).read_bytes()
    # The pulled folder is a run's folder for the other commands.
    code, stdout, stderr = invoke("apply", str(dest), "--output", str(tmp_path / "applied"))
    assert code == 0, stderr
    same_tree(tmp_path / "applied/unet", s3_run.local_run / "final/pipeline/unet")
    # A run that is not complete is refused in one line, and so is another run's folder.
    storage = open_storage(s3_run.root, s3_endpoint=s3_run.endpoint)
    busy = "0123456789abcdef"
    storage.write_bytes(
        f"runs/{busy}/manifest.json", json.dumps({"run_id": busy, "status": "running"}).encode()
    )
    one_line_error(
        ["pull", f"{s3_run.root}/runs/{busy}", str(tmp_path / "busy"), *ep], "is running, not complete"
    )
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({"run_id": busy}))
    one_line_error(["pull", s3_run.url, str(other), *ep], "holds another run")
    # The report is an output like the others: altered in the run, it is refused, not copied.
    report = storage.read_bytes(f"runs/{s3_run.run_id}/report.json")
    storage.write_bytes(f"runs/{s3_run.run_id}/report.json", b"[1]")
    try:
        one_line_error(
            ["pull", s3_run.url, str(tmp_path / "third"), *ep],
            "report.json does not match the SHA-256 its run recorded",
        )
    finally:
        storage.write_bytes(f"runs/{s3_run.run_id}/report.json", report)


def test_from_takes_a_run_by_its_url(s3_run, tmp_path):
    from mace_ray.erase.extend import extend_request

    more = tmp_path / "more.txt"
    more.write_text("ship | object | sea\n")
    out = open_storage(str(tmp_path / "new-out"))
    req = EraseRequest(concept_file=str(more), extend=s3_run.url, s3_endpoint=s3_run.endpoint)
    union, base = extend_request(out, req)
    assert base.run_id == s3_run.run_id and [c.text for c in base.concepts] == ["airplane"]
    assert union.model == "tiny" and union.settings == SETTINGS and union.extend is None
    with pytest.raises(MaceError, match="not a run id"):
        extend_request(out, dataclasses.replace(req, extend=f"{s3_run.root}/runs/xyz"))


def test_preparing_a_run_opens_the_output_once_and_reads_inputs_through_it(s3_run, tmp_path, monkeypatch):
    """Before: 4 S3 clients (the preflight probe, the output, the model's resolution, its
    fingerprint). Now the output's client serves a model under it; a model elsewhere in the
    bucket gets one client (shared by every input there)."""
    import mace_ray.erase.driver as driver

    built: list[str] = []
    real = botocore.session.Session.create_client
    monkeypatch.setattr(
        botocore.session.Session,
        "create_client",
        lambda self, *a, **k: (built.append(a[0]), real(self, *a, **k))[1],
    )

    class Prepared(Exception):
        pass

    def stop(*a, **k):
        raise Prepared(driver.prepare.__name__)

    monkeypatch.setattr(driver, "backend_for", stop)  # preparation ends where the cluster would start
    cfile = tmp_path / "c.txt"
    cfile.write_text("ship | object | sea\n")
    models = open_storage(f"s3://{s3_run.bucket}/models", s3_endpoint=s3_run.endpoint)
    models.put_dir(s3_run.local_run / "final/pipeline", "erased")
    counts = {}
    for name, model in (("under the output", f"{s3_run.url}/final/pipeline"),
                        ("elsewhere in the bucket", f"s3://{s3_run.bucket}/models/erased")):  # fmt: skip
        built.clear()
        req = EraseRequest(concept_file=str(cfile), model=model, output=s3_run.root, settings=SETTINGS,
                           executor="local", s3_endpoint=s3_run.endpoint)  # fmt: skip
        with pytest.raises(Prepared):
            driver.run_erase(req)
        counts[name] = len(built)
    assert counts == {"under the output": 2, "elsewhere in the bucket": 3}, counts


def test_a_detector_on_s3_is_checked_in_place_and_fetched_where_it_loads(s3_run, tmp_path):
    import torch

    from mace_core.grounding import build_tiny_grounding_dino, load_grounding_dino
    from mace_ray.erase.locate import check_masker_inputs, local_masks

    model, processor = build_tiny_grounding_dino()
    model.save_pretrained(tmp_path / "gdino")
    processor.save_pretrained(tmp_path / "gdino")
    open_storage(f"s3://{s3_run.bucket}/models", s3_endpoint=s3_run.endpoint).put_dir(
        tmp_path / "gdino", "gdino"
    )
    url = f"s3://{s3_run.bucket}/models/gdino"
    masks = MaskSettings(masker="grounded-sam", detector=url, segmenter="tiny")
    sources = Sources(s3_run.endpoint)
    check_masker_inputs(masks, False, sources)  # its listing only
    with pytest.raises(ModelLoadError, match=f"detector '{url}-missing': no such folder"):
        check_masker_inputs(dataclasses.replace(masks, detector=url + "-missing"), False, sources)
    open_storage(f"s3://{s3_run.bucket}/models", s3_endpoint=s3_run.endpoint).write_bytes("bare/x.md", b"x")
    with pytest.raises(
        ModelLoadError, match=r"detector '.*/models/bare': not a model folder \(no config.json\)"
    ):
        check_masker_inputs(
            dataclasses.replace(masks, detector=url[: -len("gdino")] + "bare"), False, sources
        )
    local = local_masks(masks, s3_run.endpoint)
    assert local.segmenter == "tiny" and Path(local.detector).is_dir()
    detector = load_grounding_dino(local.detector, torch.device("cpu"), 0.3, 0.25)
    assert detector is not None
