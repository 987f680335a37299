"""Through a real Ray head and its job server: `ray job submit -- mace-ray erase ...`, bad
input through the job server, errors raised inside Ray workers (a bug: exit 1 with its
traceback; bad input: one line, exit 2), and `ray job stop` or a killed driver followed by a
rerun that resumes."""

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
    # The job log as a Ray user reads it: no escape codes or blank lines, no line twice (Ray's
    # deprecation warnings included), and the workers' progress as plain lines labelled by
    # worker and concepts, each state once: "w0 data[bill-clinton-605f+1]: image steps 3/3 (1.2s)".
    lines = logs.splitlines()
    assert not [ln for ln in lines if "\x1b" in ln or not ln.strip()], [ln for ln in lines if "\x1b" in ln]
    assert not {ln for ln in lines if lines.count(ln) > 1}, {ln for ln in lines if lines.count(ln) > 1}
    assert "DeprecationWarning" not in logs
    for stage, unit in (("data", "image steps"), ("data", "masks"), ("train", "train steps")):
        done = rf"\[mace-ray\] w\d+ {stage}\[[a-z0-9-]+\+\d+\]: {unit} (\d+)/\1 \(\d+\.\ds\)$"
        assert re.search(done, logs, re.M), (unit, logs[-3000:])
    (root,) = list(out.glob("runs/*"))
    assert json.loads((root / "manifest.json").read_text())["status"] == "complete"
    StableDiffusionPipeline.from_pretrained(root / "final" / "pipeline", local_files_only=True)
    assert_same_erasure(erasure(root), reference_erasure)
    # The job's driver connected to this head (no second local Ray was started).
    assert "Started a local Ray instance" not in logs
    # Custom metrics reach the head's Prometheus endpoint (what the dashboard's metrics view reads).
    report = json.loads((root / "report.json").read_text())
    for stage in report["seconds"]:  # a progress line per stage
        assert re.search(rf"\[mace-ray\] stage {stage}: done in \d", logs), stage

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
    # The same stages in both, prepare and finish too; the report has the last stage's time up to
    # when it was written, the metric the whole stage.
    assert set(seconds) == set(report["seconds"]) and "prepare" in seconds, (seconds, report["seconds"])
    for stage, value in seconds.items():
        in_report = report["seconds"][stage]
        assert abs(value - in_report) < 0.01 or (stage == "finish" and value >= in_report), (stage, value)
    # Throughput per stage and worker: each stage's own series.
    rates = {}
    for ln in text.splitlines():
        if ln.startswith("ray_mace_worker_concepts_per_second{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', ln))
            rates[labels["stage"], labels["worker"]] = float(ln.rsplit(" ", 1)[1])
    assert {"text_statistics", "data", "train", "erasure_report"} <= {stage for stage, _ in rates}, rates
    assert all(v > 0 for v in rates.values()), rates


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


def submit_no_wait(head: dict, entrypoint: list[str], sub_id: str, cwd: Path) -> None:
    cmd = [
        ray_binary(), "job", "submit", "--address", head["dashboard"], "--submission-id", sub_id,
        "--working-dir", str(cwd), "--no-wait", "--", *entrypoint,
    ]  # fmt: skip
    r = subprocess.run(cmd, env=head["env"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def wait_for(out: Path, pattern: str, n: int, alive, timeout: float = 300) -> None:
    """Until ``n`` files match ``pattern`` under ``out``; ``alive()`` must hold meanwhile."""
    deadline = time.time() + timeout
    while time.time() < deadline and len(list(out.glob(pattern))) < n:
        assert alive(), "the driver ended before the run got that far"
        time.sleep(0.1)
    assert len(list(out.glob(pattern))) >= n, "the run got no further in time"


def manifest_of(out: Path) -> dict:
    (manifest,) = list(out.glob("runs/*/manifest.json"))
    return json.loads(manifest.read_text())


def test_job_stop_and_a_killed_driver_leave_a_run_that_resumes(ray_head, reference_erasure, tmp_path):
    """`ray job stop` (SIGTERM, then SIGKILL after RAY_JOB_STOP_WAIT_TIME_S, 3 s by default):
    the driver marks the run interrupted and releases its lease within that grace. A driver
    killed outright (SIGKILL: no clean-up of any kind) leaves "running" and its lease, which
    read as interrupted once its process is gone. Either way the same command resumes."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(ray_head["dashboard"])
    (tmp_path / "concepts.txt").write_text(CONCEPTS)
    out = tmp_path / "out"
    flags = ["--output", str(out), "--concepts-per-batch", "1", "--workers", "1", *FLAGS]
    submit_no_wait(ray_head, ["mace-ray", "erase", "concepts.txt", *flags], "mace-stop", tmp_path)
    running = {JobStatus.PENDING, JobStatus.RUNNING}
    # Stopped while it makes training data: the first concept's images and masks are stored.
    wait_for(out, "data/*/data.json", 1, lambda: client.get_job_status("mace-stop") in running)
    stop = subprocess.run(
        [ray_binary(), "job", "stop", "--address", ray_head["dashboard"], "mace-stop"],
        env=ray_head["env"], capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert stop.returncode == 0, stop.stderr[-3000:]
    deadline = time.time() + 60
    while time.time() < deadline and client.get_job_status("mace-stop") != JobStatus.STOPPED:
        time.sleep(0.5)
    logs = client.get_job_logs("mace-stop")
    assert client.get_job_status("mace-stop") == JobStatus.STOPPED, logs[-3000:]
    (root,) = list(out.glob("runs/*"))
    manifest = manifest_of(out)
    assert manifest["status"] == "interrupted" and manifest["error"] == "signal SIGTERM", logs[-3000:]
    assert not (root / "final").exists(), "the job was not stopped mid-run"
    assert not list(out.glob("locks/*.json")), "the lease was left behind"
    # Done by the driver itself, within Ray's grace (after it, Ray kills: no line then).
    assert "run marked interrupted (signal SIGTERM) and its lease released" in logs, logs[-3000:]

    # The same command again: it takes up the stored data, and is killed outright (SIGKILL)
    # once a concept is trained.
    args = [MACE_RAY, "erase", str(tmp_path / "concepts.txt"), "--address", ray_head["gcs"], *flags]
    driver = subprocess.Popen(args, env=ray_head["env"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(out, "runs/*/concepts/*/DONE", 1, lambda: driver.poll() is None)
    driver.kill()  # SIGKILL: no clean-up of any kind
    driver.wait()
    time.sleep(5)  # Ray ends the dead driver's actors; one may store the batch it was training
    done = sorted(p.parent for p in out.glob("runs/*/concepts/*/DONE"))
    assert len(done) < 4, "the driver was not killed mid-run"
    assert manifest_of(out)["status"] == "running" and list(out.glob("locks/*.json"))
    assert not (root / "final").exists()
    # Its lease names a process that is gone: the run reads as interrupted, not running.
    status = subprocess.run(
        [MACE_RAY, "status", root.name, "--output", str(out)],
        env=ray_head["env"], capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert status.returncode == 0 and json.loads(status.stdout)["status"] == "interrupted", status.stderr
    stamps = {d.name: (d / "lora.safetensors").stat().st_mtime_ns for d in done}

    again = subprocess.run(args, env=ray_head["env"], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "was left running by a driver that is gone" in again.stderr
    assert f"train: {len(done)} concepts done before, {4 - len(done)} to do" in again.stderr
    assert "data: images and masks of 0 concepts made, " in again.stderr  # all made before
    # None of the DONE concepts was recomputed.
    assert stamps == {d.name: (d / "lora.safetensors").stat().st_mtime_ns for d in done}
    assert json.loads((root / "report.json").read_text())["resumed"] == 2
    assert not list(out.glob("locks/*.json"))
    assert_same_erasure(erasure(root), reference_erasure)


# A worker_process_setup_hook (Ray runs it in every worker process of the job before any
# task) that breaks the text workers' loading: an error raised inside a Ray worker.
FAULTS = """
import os


def break_text_workers():
    from mace_core.errors import ModelLoadError
    from mace_ray.erase.text_worker import TextWorker

    def load(self):
        if os.environ["MACE_TEST_FAULT"] == "bug":
            raise ValueError("operands could not be broadcast together with shapes (77,768) (77,1024)")
        raise ModelLoadError("model 'tiny': text_encoder/ cannot be loaded: header too large")

    TextWorker.load = load
"""


@pytest.mark.parametrize("fault", ["bug", "input"])
def test_an_error_in_a_ray_worker_is_a_bug_or_bad_input(ray_head, tmp_path, fault):
    from ray.job_submission import JobSubmissionClient

    (tmp_path / "faults.py").write_text(FAULTS)
    (tmp_path / "concepts.txt").write_text("airplane | object | sky\n")
    out = tmp_path / "out"
    env = {"worker_process_setup_hook": "faults.break_text_workers", "env_vars": {"MACE_TEST_FAULT": fault}}
    sub_id = f"mace-fault-{fault}"
    cmd = [
        ray_binary(), "job", "submit", "--address", ray_head["dashboard"], "--submission-id", sub_id,
        "--working-dir", str(tmp_path), "--runtime-env-json", json.dumps(env),
        "--", "mace-ray", "erase", "concepts.txt", "--output", str(out), *FLAGS,
    ]  # fmt: skip
    subprocess.run(cmd, env=ray_head["env"], capture_output=True, text=True, timeout=600)
    info = JobSubmissionClient(ray_head["dashboard"]).get_job_info(sub_id)
    status, logs = job_status(ray_head, sub_id)
    assert status == "FAILED", logs[-3000:]
    ours = [ln for ln in logs.splitlines() if ln.startswith("mace-ray:")]
    if fault == "bug":
        assert info.driver_exit_code == 1, logs[-3000:]
        assert "Traceback (most recent call last)" in logs and "RayTaskError(ValueError)" in logs
        assert len(ours) == 1 and ours[0].startswith("mace-ray: internal error (a bug in mace-ray"), ours
        assert "ValueError: operands could not be broadcast" in ours[0]
    else:
        assert info.driver_exit_code == 2, logs[-3000:]
        message = "mace-ray: error: model 'tiny': text_encoder/ cannot be loaded: header too large"
        assert ours == [message], logs[-3000:]
    assert manifest_of(out)["status"] == "failed"  # the run resumes once the cause is fixed
    assert not list(out.glob("locks/*.json"))
