"""Runs that grow: training data shared by content address, `erase --from RUN`, `gc`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import SETTINGS, assert_same_erasure, erasure, request, run_cli

from mace_core.concepts import Concept, ConceptType
from mace_core.errors import MaceError
from mace_core.options import from_plain
from mace_core.settings import DataSettings, EraseSettings, MaskSettings, Precision, TrainSettings
from mace_ray.erase import artefacts
from mace_ray.erase.driver import run_erase
from mace_ray.erase.gc import collect_garbage
from mace_ray.erase.layout import RunLayout
from mace_ray.storage.lease import RunLock
from mace_ray.storage.local import LocalStorage


def data_stamps(out: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in out.glob("data/*/*/*.png")}


@pytest.fixture(scope="module")
def grown(tmp_path_factory) -> dict:
    """{dog, cat}, then the same output extended by {airplane} through the CLI."""
    tmp = tmp_path_factory.mktemp("grow")
    out = tmp / "out"
    (tmp / "first.txt").write_text("dog\ncat\n")
    first = run_erase(request(tmp / "first.txt", out, executor="local", concepts_per_batch=2))
    before = data_stamps(out)
    (tmp / "more.txt").write_text("airplane | object | sky\ncat\n")  # cat is in the run already
    r = run_cli(
        "erase", str(tmp / "more.txt"), "--from", first["run_id"], "--output", str(out), "--executor", "local"
    )
    assert r.returncode == 0, r.stderr[-3000:]
    line = json.loads(r.stdout.strip().splitlines()[-1])
    return {
        "tmp": tmp,
        "out": out,
        "first": first,
        "before": before,
        "run_id": line["run_id"],
        "stderr": r.stderr,
    }


def test_extension_makes_only_the_new_concepts_data(grown):
    out, first = grown["out"], grown["first"]
    root = out / "runs" / grown["run_id"]
    report = json.loads((root / "report.json").read_text())
    assert [c["text"] for c in report["concepts"]] == ["dog", "cat", "airplane"]
    assert report["data"] == {"made": 1, "reused": 2}
    # Not one image or mask of dog or cat was written again; airplane's are new.
    after = data_stamps(out)
    assert all(after[p] == t for p, t in grown["before"].items())
    assert len(after) == len(grown["before"]) * 3 // 2
    refs = json.loads((root / "refs.json").read_text())["data"]
    first_refs = json.loads((out / "runs" / first["run_id"] / "refs.json").read_text())["data"]
    assert {k: refs[k] for k in first_refs} == first_refs  # the same data keys, shared
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["extends"] == first["run_id"] and manifest["settings"] == SETTINGS.to_dict()
    assert "1 concepts are already in run" in grown["stderr"]
    # What a reader of the run (mace-ray audit) gets: the shared images, through refs.json.
    dog = Concept("dog", ConceptType.OBJECT, "scene")
    data = artefacts.run_data(LocalStorage(out), RunLayout(grown["run_id"]), dog)
    assert data is not None and data.images.shape[0] == SETTINGS.data.images_per_concept
    assert artefacts.run_data(LocalStorage(out), RunLayout("0123456789abcdef"), dog) is None


def test_extension_equals_a_fresh_run_over_the_union(grown, tmp_path):
    (tmp_path / "all.txt").write_text("dog\ncat\nairplane | object | sky\n")
    fresh = run_erase(
        request(tmp_path / "all.txt", tmp_path / "fresh", executor="local", concepts_per_batch=3)
    )
    assert fresh["run_id"] == grown["run_id"]  # the same inputs: the same run
    assert_same_erasure(
        erasure(Path(fresh["output"]["root"])), erasure(grown["out"] / "runs" / grown["run_id"])
    )


def test_from_refuses_what_contradicts_the_run(grown):
    out, run = str(grown["out"]), grown["first"]["run_id"]
    more = str(grown["tmp"] / "more.txt")
    cases = [
        (["--from", run, "--images", "3"], "setting data.images_per_concept = 3 differs from the run's 2"),
        (["--from", run, "--model", "/some/other/model"], "the run erases from model 'tiny'"),
        (["--from", "0123456789abcdef"], "--from '0123456789abcdef': no such run under"),
        (["--from", "../../etc"], "not a run id"),
    ]
    for extra, needle in cases:
        r = run_cli("erase", more, "--output", out, "--executor", "local", *extra)
        lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
        assert r.returncode == 2 and needle in r.stderr, r.stderr[-2000:]
        # One line (after the progress line of the stage that found it).
        assert lines[-1].startswith("mace-ray: error:") and needle in lines[-1], r.stderr
        assert sum("error" in ln for ln in lines) == 1, r.stderr


def test_gc_removes_only_unreferenced_data(grown, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(grown["out"], out)
    assert len(list(out.glob("data/*"))) == 3
    # Both runs refer to the data: nothing to remove.
    assert collect_garbage(str(out))["data_removed"] == 0
    # Without the first run, the extension still refers to all three.
    shutil.rmtree(out / "runs" / grown["first"]["run_id"])
    assert collect_garbage(str(out))["data_removed"] == 0 and len(list(out.glob("data/*"))) == 3
    # Without any run: a dry run lists all three and removes nothing; gc removes them.
    shutil.rmtree(out / "runs" / grown["run_id"])
    dry = collect_garbage(str(out), dry_run=True)
    assert dry["data_unreferenced"] == 3 and dry["files"] == 3 * 2 * 2 + 3
    assert len(list(out.glob("data/*"))) == 3
    # A driver holding a run's lease: gc refuses (the run may be about to use the data).
    lock = RunLock(LocalStorage(out), "locks/0123456789abcdef.json", ttl_s=60, heartbeat_s=10)
    lock.acquire(wait_s=0)
    try:
        r = run_cli("gc", "--output", str(out))
        assert r.returncode == 2 and "run 0123456789abcdef is running" in r.stderr, r.stderr
    finally:
        lock.release()
    r = run_cli("gc", "--output", str(out))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["data_removed"] == 3 and not list(out.glob("data/*/*"))


def test_gc_refuses_a_refs_json_that_is_not_a_mapping_in_one_line(tmp_path):
    refs = tmp_path / "out" / "runs" / "0123456789abcdef" / "refs.json"
    refs.parent.mkdir(parents=True)
    refs.write_text("[1]")  # valid JSON, but not a run's refs.json: bad input, not a bug
    with pytest.raises(MaceError, match=r"refs.json: not a mace-ray refs.json \(expected a mapping\)"):
        collect_garbage(str(tmp_path / "out"))


def test_settings_round_trip_through_their_plain_form():
    s = EraseSettings(
        train=TrainSettings(steps=3, lr=2e-4, lora_init="kaiming"),
        data=DataSettings(images_per_concept=2),
        masks=MaskSettings(masker="whole-image", box_threshold=0.5),
        prompts_per_concept=None,
        precision="fp32",
    )
    back = from_plain(EraseSettings, json.loads(json.dumps(s.to_dict())))
    assert back == s and back.precision is Precision.FP32
    with pytest.raises(ValueError, match="TrainSettings: unknown setting 'stepz'"):
        from_plain(EraseSettings, {"train": {"stepz": 3}})
