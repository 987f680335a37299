"""Bad input is one line and exit 2; anything else is a bug: its traceback, a last line saying
so, exit 1. Wherever it is raised: in the driver, in a worker of this process, or in a Ray
worker (whose error comes back wrapped; tests/test_ray_job.py runs both through a Ray job)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import FLAGS
from typer.testing import CliRunner

from mace_core.errors import ConceptError, MaceError, ModelLoadError, SettingError
from mace_core.settings import TrainSettings
from mace_ray.cli.errors import bug_line, input_error
from mace_ray.cli.main import app
from mace_ray.erase.text_worker import TextWorker

# What a shape mismatch deep in a library looks like: a ValueError that is no one's input.
INTERNAL = "operands could not be broadcast together with shapes (77,768) (77,1024)"


def erase_with_a_broken_worker(tmp_path: Path, monkeypatch, error: Exception):
    """`mace-ray erase` in this process, its text worker raising ``error`` when it loads."""

    def broken_load(self: TextWorker) -> dict:
        raise error

    monkeypatch.setattr(TextWorker, "load", broken_load)
    cfile = tmp_path / "c.txt"
    cfile.write_text("airplane | object | sky\n")
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["erase", str(cfile), "--output", str(out), "--executor", "local", *FLAGS])
    (manifest,) = out.glob("runs/*/manifest.json")
    return r, json.loads(manifest.read_text())


def test_an_internal_error_in_a_worker_is_a_bug_with_its_traceback(tmp_path, monkeypatch):
    r, manifest = erase_with_a_broken_worker(tmp_path, monkeypatch, ValueError(INTERNAL))
    assert r.exit_code == 1, r.stderr
    assert "Traceback (most recent call last)" in r.stderr and "broken_load" in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("mace-ray: internal error (a bug in mace-ray, not a problem with your input)")
    assert f"ValueError: {INTERNAL}" in last and "Please report it to" in last
    assert "mace-ray: error:" not in r.stderr  # never passed off as bad input
    assert manifest["status"] == "failed" and INTERNAL in manifest["error"]  # resumable


def test_bad_input_found_in_a_worker_is_one_line(tmp_path, monkeypatch):
    message = "model '/models/x': unet/ cannot be loaded: header too large"
    r, manifest = erase_with_a_broken_worker(tmp_path, monkeypatch, ModelLoadError(message))
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert r.exit_code == 2 and lines == [f"mace-ray: error: {message}"], r.stderr
    assert manifest["status"] == "failed"


def test_settings_and_values_are_refused_as_setting_errors():
    """What a user sets is checked by the project's own class (still a ValueError for code
    that validates the Python way); the CLI catches no bare ValueError around a run."""
    with pytest.raises(SettingError, match="steps must be >= 0"):
        TrainSettings(steps=-1)
    with pytest.raises(SettingError, match="unknown lora_init 'xavier'"):
        TrainSettings(lora_init="xavier")
    assert issubclass(SettingError, MaceError) and issubclass(SettingError, ValueError)
    import inspect

    import mace_ray.cli.main as main
    import mace_ray.cli.report as report

    for module in (main, report):
        assert "except (MaceError, ValueError)" not in inspect.getsource(module)
        assert "except ValueError" not in inspect.getsource(module)


def test_a_ray_task_error_is_bad_input_only_when_it_wraps_a_mace_error():
    """Ray re-raises a task's error as a RayTaskError that is also an instance of the
    original class, with Ray's traceback text as its message: bad input is unwrapped to its
    own one line; a wrapped ValueError stays a bug."""
    from ray.exceptions import RayTaskError

    cause = ConceptError("c.txt:1: unknown concept type 'animal'")
    wrapped = RayTaskError(
        "text_stats", "Traceback (most recent call last): ...", cause
    ).as_instanceof_cause()
    assert isinstance(wrapped, MaceError)  # so a bare `except MaceError` would print Ray's text
    assert input_error(wrapped) is cause
    bug = RayTaskError("text_stats", "Traceback ...", ValueError(INTERNAL)).as_instanceof_cause()
    assert isinstance(bug, ValueError) and input_error(bug) is None
    assert f"ValueError: {INTERNAL}" in bug_line(bug) and "a bug in mace-ray" in bug_line(bug)
    assert input_error(ValueError(INTERNAL)) is None and input_error(cause) is cause
