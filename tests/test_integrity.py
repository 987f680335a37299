"""Never a stale or mixed model, no artefact trusted unchecked, one driver per run.

Each test damages or changes something a run depends on and checks that the result is
still the one an unfaulted run over the current inputs gives.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from helpers import FLAGS, MACE_RAY, request
from safetensors.torch import load as safetensors_load
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mace_core.checkpoints import read_erasure
from mace_core.fingerprint import ModelChangedError
from mace_ray.cli.main import app
from mace_ray.erase.driver import run_erase

CONCEPTS = "Bill Clinton | celebrity\nVan Gogh | style\nairplane | object | sky\n"
UNET = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(autouse=True)
def digest_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MACE_DIGEST_CACHE", str(tmp_path / "digests"))


@pytest.fixture
def model(tiny_model_folder, tmp_path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_folder, copy)
    return copy


@pytest.fixture
def cfile(tmp_path) -> Path:
    f = tmp_path / "concepts.txt"
    f.write_text(CONCEPTS)
    return f


def change_unet(model: Path) -> torch.Tensor:
    """Retrain the UNet in place (as a user replacing the weights would): returns the new
    conv_in weight, a tensor that erasure never touches."""
    path = model / UNET
    t = load_file(path)
    t["conv_in.weight"] = t["conv_in.weight"] + 0.25
    save_file(t, path)
    return t["conv_in.weight"]


def final_conv_in(report: dict) -> torch.Tensor:
    return load_file(Path(report["output"]["root"]) / "final/pipeline" / UNET)["conv_in.weight"]


def erasure_of(report: dict) -> dict[str, torch.Tensor]:
    return read_erasure((Path(report["output"]["root"]) / "final/erasure.safetensors").read_bytes())[0]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        # Same machine, same seeds: equal up to summation order in the closed forms.
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7), k


def test_a_unet_changed_after_a_complete_run_makes_a_new_run(model, cfile, tmp_path):
    out = tmp_path / "out"
    req = dataclasses.replace(request(cfile, out, executor="local"), model=str(model))
    old = run_erase(req)
    new_conv = change_unet(model)
    again = run_erase(req)
    assert again["run_id"] != old["run_id"]  # never "already complete" with the old weights
    assert torch.equal(final_conv_in(again), new_conv)
    assert not torch.equal(final_conv_in(old), new_conv)

    # The old erasure belongs to the old weights: apply refuses it on the new ones, in one line.
    erasure = Path(old["output"]["root"]) / "final/erasure.safetensors"
    args = ["apply", str(erasure), "--model", str(model), "--output", str(tmp_path / "applied")]
    r = CliRunner().invoke(app, args)
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and "fingerprint" in lines[0], r.stderr
    assert not (tmp_path / "applied").exists()
    assert CliRunner().invoke(app, [*args, "--other-model"]).exit_code == 0
    # ... and takes the new erasure.
    new_erasure = Path(again["output"]["root"]) / "final/erasure.safetensors"
    r = CliRunner().invoke(
        app, ["apply", str(new_erasure), "--model", str(model), "--output", str(tmp_path / "a2")]
    )
    assert r.exit_code == 0, r.stderr


def test_a_unet_changed_mid_run_never_yields_a_mixed_model(model, cfile, tmp_path, monkeypatch):
    from mace_ray.erase.concept_worker import ConceptWorker

    out = tmp_path / "out"
    req = dataclasses.replace(request(cfile, out, executor="local"), model=str(model))
    prepare_data = ConceptWorker.prepare_data
    changed: list[torch.Tensor] = []

    def change_after_images(self, concepts):
        result = prepare_data(self, concepts)
        if not changed:
            changed.append(change_unet(model))
        return result

    monkeypatch.setattr(ConceptWorker, "prepare_data", change_after_images)
    with pytest.raises(ModelChangedError, match="changed after the run started"):
        run_erase(req)
    (manifest_path,) = out.glob("runs/*/manifest.json")
    manifest = json.loads(manifest_path.read_text())
    assert manifest["status"] == "failed" and "changed" in manifest["error"]
    assert not (manifest_path.parent / "report.json").exists()

    monkeypatch.setattr(ConceptWorker, "prepare_data", prepare_data)
    rerun = run_erase(req)
    assert rerun["run_id"] != manifest["run_id"]
    assert torch.equal(final_conv_in(rerun), changed[0])  # built from the new weights only


def test_damaged_artefacts_are_redone_and_the_result_is_unchanged(cfile, tmp_path, caplog):
    out = tmp_path / "out"
    req = request(cfile, out, executor="local")
    first = run_erase(req)
    reference = erasure_of(first)
    root = Path(first["output"]["root"])
    concepts = root / "concepts"
    slug = {d.name.rsplit("-", 1)[0]: d.name for d in concepts.iterdir()}  # slugs end in a hash
    # Read into memory: load_file maps the file, which the test truncates below.
    lora_before = safetensors_load((concepts / slug["van-gogh"] / "lora.safetensors").read_bytes())

    # 1. A truncated final UNet and a truncated LoRA (a file the run hands out too): the
    # complete run is not returned as it is; the LoRA is trained again, the final files written again.
    unet = root / "final/pipeline" / UNET
    unet.write_bytes(unet.read_bytes()[: unet.stat().st_size // 2])
    lora = concepts / slug["van-gogh"] / "lora.safetensors"
    lora.write_bytes(lora.read_bytes()[:-100])
    with caplog.at_level(logging.WARNING, logger="mace_ray"):
        again = run_erase(req)
    assert again["run_id"] == first["run_id"]
    warnings = " | ".join(r.getMessage() for r in caplog.records)
    lora_key = f"runs/{first['run_id']}/concepts/{slug['van-gogh']}/lora.safetensors"
    assert f"was complete, but {lora_key} does not match its checksum" in warnings
    assert f"{slug['van-gogh']}: lora.safetensors is missing or does not match its checksum" in warnings
    load_file(unet)  # whole again
    assert_same_weights(safetensors_load(lora.read_bytes()), lora_before)
    assert_same_weights(erasure_of(again), reference)
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["status"] == "complete" and lora_key in manifest["outputs"]

    # 2. A run stopped before fusion, whose reused artefacts were damaged meanwhile.
    manifest_path = root / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["status"] = "interrupted"
    manifest_path.write_text(json.dumps(manifest))
    shutil.rmtree(root / "final")
    (root / "report.json").unlink()
    (concepts / slug["bill-clinton"] / "DONE").unlink()  # not finished: trained again
    lora.write_bytes(lora.read_bytes()[:100])  # finished, but its LoRA is truncated
    stats = concepts / slug["airplane"] / "stats.safetensors"  # statistics altered in place
    stats.write_bytes(stats.read_bytes()[:-8] + b"\x00" * 8)
    data_key = json.loads((root / "refs.json").read_text())["data"][slug["van-gogh"]]
    image = out / "data" / data_key / "images/000.png"
    image.write_bytes(image.read_bytes()[:-4] + b"\x00\x00\x00\x00")
    (prior,) = (out / "cache/prior").iterdir()
    prior.write_bytes(prior.read_bytes()[:-8] + b"\x01" * 8)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mace_ray"):
        resumed = run_erase(req)
    warnings = " | ".join(r.getMessage() for r in caplog.records)
    assert f"{slug['van-gogh']}: lora.safetensors is missing or does not match its checksum" in warnings
    assert f"{slug['airplane']}/stats.safetensors does not match its checksum" in warnings
    assert "images/000.png does not match its checksum" in warnings
    assert f"{prior.name} does not match its checksum" in warnings
    assert resumed["status"] == "complete"
    assert_same_weights(
        safetensors_load(lora.read_bytes()), lora_before
    )  # retrained from regenerated images: the same
    assert_same_weights(erasure_of(resumed), reference)


def test_two_drivers_on_one_run_do_the_work_once(cfile, tmp_path):
    from mace_ray.storage.lease import RunLock
    from mace_ray.storage.local import LocalStorage

    out = tmp_path / "out"
    cmd = [MACE_RAY, "erase", str(cfile), "--output", str(out), "--executor", "local", *FLAGS]
    env = {**os.environ, "MACE_DIGEST_CACHE": str(tmp_path / "digests")}
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = [
        subprocess.Popen([*cmd, "--lock-wait", "600"], stderr=log.open("w"), stdout=subprocess.PIPE, env=env)
        for log in logs
    ]
    for p in procs:
        p.wait(timeout=900)
    errs = [log.read_text() for log in logs]
    assert [p.returncode for p in procs] == [0, 0], errs
    ran = [e for e in errs if "stage train: done" in e]
    assert len(ran) == 1, errs  # one driver trained, the other waited for it
    waited = errs[1 - errs.index(ran[0])]
    assert "held by another driver" in waited and "already complete" in waited and "stage train" not in waited
    (run_id,) = [p.name for p in (out / "runs").iterdir()]
    assert not list((out / "locks").glob("*.json"))  # both released (dot-files are flock files)

    # While another driver holds the run: one that will not wait is refused in one line naming
    # it; one that waits starts when the holder lets go.
    holder = RunLock(LocalStorage(out), f"locks/{run_id}.json", ttl_s=30, heartbeat_s=5)
    holder.acquire()
    try:
        refused = subprocess.run(
            [*cmd, "--lock-wait", "0"], capture_output=True, text=True, env=env, timeout=300
        )
        assert refused.returncode == 2, refused.stderr
        lines = [ln for ln in refused.stderr.splitlines() if "error" in ln]
        assert len(lines) == 1 and "held by another driver" in lines[0] and f"pid {os.getpid()}" in lines[0]
        log = tmp_path / "c.log"
        waiting = subprocess.Popen([*cmd, "--lock-wait", "600"], stderr=log.open("w"), env=env)
        deadline = time.monotonic() + 300
        while "waiting up to" not in log.read_text():
            assert waiting.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
    finally:
        holder.release()
    assert waiting.wait(timeout=300) == 0, log.read_text()
    assert "already complete" in log.read_text()


def test_an_unreachable_s3_output_is_one_line_within_seconds(cfile, tmp_path, monkeypatch):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "MACETESTNOBODY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-a-secret")
    args = ["erase", str(cfile), "--model", "tiny", "--executor", "local", "--output", "s3://bucket/runs"]
    t = time.monotonic()
    r = CliRunner().invoke(app, [*args, "--s3-endpoint", f"http://127.0.0.1:{port}"])
    assert time.monotonic() - t < 60
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1, r.stderr
    assert f"127.0.0.1:{port}" in lines[0] and "completed work is kept" not in lines[0]
