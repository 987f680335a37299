"""Through a real Ray head and its job server: `ray job submit -- mace-ray erase ...`,
bad input through the job server, and resume after the driver is killed."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import (
    CONCEPTS,
    FLAGS,
    MACE_RAY,
    assert_same_erasure,
    env_with_venv,
    erasure,
    free_port,
    ray_binary,
)

HEAD_TIMEOUT = 90


@pytest.fixture(scope="module")
def ray_head():
    """`ray start --head --block` with the dashboard on 127.0.0.1; stopped by killing that process."""
    env = env_with_venv()
    ports = {
        name: free_port() for name in ("gcs", "dash", "client", "agent", "agent_grpc", "metrics", "renv")
    }
    temp_dir = tempfile.mkdtemp(prefix="rt-", dir="/tmp")  # short: Ray's unix sockets live here
    cmd = [
        ray_binary(), "start", "--head", "--block", "--disable-usage-stats",
        "--num-cpus=2", "--num-gpus=1",
        f"--port={ports['gcs']}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
        f"--dashboard-port={ports['dash']}", f"--ray-client-server-port={ports['client']}",
        f"--dashboard-agent-listen-port={ports['agent']}",
        f"--dashboard-agent-grpc-port={ports['agent_grpc']}",
        f"--metrics-export-port={ports['metrics']}", f"--runtime-env-agent-port={ports['renv']}",
        f"--temp-dir={temp_dir}",
    ]  # fmt: skip
    log = open(Path(temp_dir) / "head.log", "w")  # noqa: SIM115 (closed at teardown)
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    dash = f"http://127.0.0.1:{ports['dash']}"
    deadline = time.time() + HEAD_TIMEOUT
    while time.time() < deadline:
        r = subprocess.run([ray_binary(), "job", "list", "--address", dash], env=env, capture_output=True)
        if r.returncode == 0:
            break
        assert proc.poll() is None, (Path(temp_dir) / "head.log").read_text()[-3000:]
        time.sleep(1)
    else:
        raise AssertionError("the Ray head did not answer in time")
    yield {
        "gcs": f"127.0.0.1:{ports['gcs']}",
        "dashboard": dash,
        "metrics": f"http://127.0.0.1:{ports['metrics']}/metrics",
        "env": env,
    }
    os.killpg(proc.pid, signal.SIGTERM)  # --block: the head stops its own processes
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    log.close()


def submit(head: dict, entrypoint: list[str], sub_id: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [
        ray_binary(), "job", "submit", "--address", head["dashboard"], "--submission-id", sub_id,
        "--working-dir", str(cwd), "--", *entrypoint,
    ]  # fmt: skip
    return subprocess.run(cmd, env=head["env"], capture_output=True, text=True, timeout=600)


def job_status(head: dict, sub_id: str) -> tuple[str, str]:
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(head["dashboard"])
    return str(client.get_job_status(sub_id).value), client.get_job_logs(sub_id)


def test_job_submit_end_to_end(ray_head, reference_erasure, tmp_path):
    from diffusers import StableDiffusionPipeline

    (tmp_path / "concepts.txt").write_text(CONCEPTS)
    out = tmp_path / "out"
    entry = ["mace-ray", "erase", "concepts.txt", "--output", str(out), "--concepts-per-batch", "2", *FLAGS]
    proc = submit(ray_head, entry, "mace-e2e", tmp_path)
    status, logs = job_status(ray_head, "mace-e2e")
    assert status == "SUCCEEDED", (proc.stdout[-3000:], proc.stderr[-3000:], logs[-3000:])
    assert "stage train: done" in logs and '"status": "complete"' in logs
    assert "train steps" in logs and "image steps" in logs  # tqdm_ray bars from the workers
    (root,) = list(out.glob("runs/*"))
    assert json.loads((root / "manifest.json").read_text())["status"] == "complete"
    StableDiffusionPipeline.from_pretrained(root / "final" / "pipeline", local_files_only=True)
    assert_same_erasure(erasure(root), reference_erasure)
    # The job's driver connected to this head (no second local Ray was started).
    assert "Started a local Ray instance" not in logs
    # Custom metrics reach the head's Prometheus endpoint (what the dashboard's metrics view reads).
    report = json.loads((root / "report.json").read_text())

    def series(text: str, name: str) -> dict[str, float]:
        """{stage or worker or "": value} of a metric's samples (Ray's own labels ignored)."""
        out: dict[str, float] = {}
        for ln in text.splitlines():
            if ln.startswith(name + "{"):
                label = re.search(r'(?:stage|worker)="([^"]*)"', ln)
                key = label.group(1) if label else ""
                assert key not in out, f"{name} {key!r} recorded by more than one process"
                out[key] = float(ln.rsplit(" ", 1)[1])
        return out

    # Metrics are exported every few seconds: wait until the last stage's time is there.
    deadline, text = time.time() + 60, ""
    while time.time() < deadline and 'stage="finish"' not in text:
        try:
            text = urllib.request.urlopen(ray_head["metrics"], timeout=5).read().decode()
        except OSError:
            text = ""
        time.sleep(2)
    # A done/total pair, failures present at 0, each stage's driver wall time exactly once.
    assert series(text, "ray_mace_concepts_done") == series(text, "ray_mace_concepts_total") == {"": 4.0}
    assert series(text, "ray_mace_concepts_failed") == {"": 0.0}
    seconds = series(text, "ray_mace_stage_seconds")
    assert {"workers_start", "text_statistics", "train", "fusion"} <= set(seconds), seconds
    # The last stage writes the report, so its time is a metric only.
    assert set(seconds) - set(report["seconds"]) <= {"finish"}, (seconds, report["seconds"])
    for stage, value in seconds.items():
        if stage != "finish":
            assert abs(value - report["seconds"][stage]) < 0.01, (stage, value, report["seconds"])
    assert series(text, "ray_mace_worker_concepts_per_second")


def test_job_submit_bad_input(ray_head, tmp_path):
    (tmp_path / "concepts.txt").write_text("dog | animal\n")
    out = tmp_path / "out"
    submit(
        ray_head, ["mace-ray", "erase", "concepts.txt", "--output", str(out), *FLAGS], "mace-bad", tmp_path
    )
    status, logs = job_status(ray_head, "mace-bad")
    assert status == "FAILED"
    errors = [ln for ln in logs.splitlines() if ln.startswith("mace-ray: error:")]
    valid = "object, celebrity, style, explicit"
    assert errors == [f"mace-ray: error: concepts.txt:1: unknown concept type 'animal' (valid: {valid})"]
    assert "Traceback" not in logs
    assert not list(out.glob("runs/*/manifest.json"))  # nothing written, nothing complete


def test_resume_after_the_driver_is_killed(ray_head, reference_erasure, tmp_path):
    cfile = tmp_path / "concepts.txt"
    cfile.write_text(CONCEPTS)
    out = tmp_path / "out"
    args = [MACE_RAY, "erase", str(cfile), "--output", str(out), "--address", ray_head["gcs"]]
    args += ["--concepts-per-batch", "1", "--workers", "1", *FLAGS]
    driver = subprocess.Popen(args, env=ray_head["env"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and len(list(out.glob("runs/*/concepts/*/DONE"))) < 2:
        assert driver.poll() is None, driver.stderr.read().decode()[-3000:]
        time.sleep(0.1)
    driver.kill()  # SIGKILL: no clean-up of any kind
    driver.wait()
    done = sorted(p.parent for p in out.glob("runs/*/concepts/*/DONE"))
    assert 2 <= len(done) < 4, "the driver was not killed mid-run"
    (root,) = list(out.glob("runs/*"))
    assert json.loads((root / "manifest.json").read_text())["status"] == "running"
    assert not (root / "final").exists()
    stamps = {d.name: (d / "lora.safetensors").stat().st_mtime_ns for d in done}

    again = subprocess.run(args, env=ray_head["env"], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"train: {len(done)} concepts done before, {4 - len(done)} to do" in again.stderr
    # None of the DONE concepts was recomputed.
    assert stamps == {d.name: (d / "lora.safetensors").stat().st_mtime_ns for d in done}
    assert json.loads((root / "report.json").read_text())["resumed"] == 1
    assert_same_erasure(erasure(root), reference_erasure)
