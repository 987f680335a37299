"""`mace-ray status`, `mace-ray cache-prior` and `--config` files."""

from __future__ import annotations

import json

from helpers import CONCEPTS, FLAGS, run_cli
from typer.testing import CliRunner

from mace_ray.cli.main import app


def test_cache_prior_then_erase_reuses_it_and_status(tmp_path):
    caps = tmp_path / "captions.txt"
    caps.write_text("a cat on a sofa\na red bus in the street\n\nthree people on a beach\n")
    out = tmp_path / "out"
    r = run_cli("cache-prior", str(caps), "--model", "tiny", "--output", str(out), "--executor", "local")
    assert r.returncode == 0, r.stderr
    first = json.loads(r.stdout.strip().splitlines()[-1])
    assert first["captions"] == 3 and first["tokens"] == 3 * 77 and first["cached"] is False
    again = json.loads(
        run_cli(
            "cache-prior", str(caps), "--model", "tiny", "--output", str(out), "--executor", "local"
        ).stdout
    )
    assert again["cached"] is True and again["key"] == first["key"]

    (tmp_path / "c.txt").write_text(CONCEPTS)
    e = run_cli("erase", str(tmp_path / "c.txt"), "--output", str(out), "--executor", "local",
                "--prior-captions", str(caps), *FLAGS)  # fmt: skip
    assert e.returncode == 0, e.stderr
    run_id = json.loads(e.stdout.strip().splitlines()[-1])["run_id"]
    rep = json.loads((out / "runs" / run_id / "report.json").read_text())
    assert rep["prior_cache_hit"] is True and rep["tokens"]["prior"] == 3 * 77

    s = CliRunner().invoke(app, ["status", run_id, "--output", str(out)])
    assert s.exit_code == 0, s.output
    st = json.loads(s.stdout)
    assert st["status"] == "complete" and st["concepts"] == st["concepts_done"] == 4

    missing = CliRunner().invoke(app, ["status", "nope", "--output", str(out)])
    assert missing.exit_code == 2 and "run 'nope': no manifest" in missing.stderr


def test_config_file_supplies_options_and_cli_overrides(tmp_path, monkeypatch):
    import mace_ray.erase.driver as erase_mod

    seen = {}

    def fake_run(req):  # capture the request: this test is about option parsing only
        seen["req"] = req
        return {"run_id": "x", "status": "complete", "output": {}}

    monkeypatch.setattr(erase_mod, "run_erase", fake_run)
    (tmp_path / "c.txt").write_text("Bill Clinton\n")
    cfg = tmp_path / "job.yaml"
    cfg.write_text(
        f"concepts: {tmp_path / 'c.txt'}\ntype: celebrity\nlr: 0.0001\ntrain_steps: 7\nworkers: 3\n"
    )
    r = CliRunner().invoke(app, ["erase", "--config", str(cfg), "--train-steps", "9"])
    assert r.exit_code == 0, r.output
    req = seen["req"]
    assert req.concept_file == str(tmp_path / "c.txt") and req.default_type.value == "celebrity"
    assert req.settings.train.lr == 1e-4 and req.settings.train.steps == 9 and req.workers == 3

    cfg.write_text("concepts: c.txt\nlearning_rate: 1\n")
    bad = CliRunner().invoke(app, ["erase", "--config", str(cfg)])
    assert bad.exit_code == 2 and "unknown option 'learning_rate'" in bad.stderr
    gone = CliRunner().invoke(app, ["erase", "--config", str(tmp_path / "none.yaml")])
    assert gone.exit_code == 2 and "does not exist" in gone.stderr
    # A bad value: one line naming the file and the key, not a usage box about an option.
    for text, needle in (
        ("images: many\n", "valid integer"),
        ("images: 0\n", "greater than or equal to 1"),
    ):
        cfg.write_text(f"concepts: c.txt\n{text}")
        bad = CliRunner().invoke(app, ["erase", "--config", str(cfg)])
        lines = [ln for ln in bad.stderr.strip().splitlines() if ln.strip()]
        assert bad.exit_code == 2 and len(lines) == 1, bad.stderr
        assert lines[0].startswith(f"mace-ray: error: config {str(cfg)!r}: images: "), lines[0]
        assert needle in lines[0] and "--images" in lines[0], lines[0]


def test_unknown_executor_is_bad_input(tmp_path):
    (tmp_path / "c.txt").write_text("dog\n")
    r = CliRunner().invoke(app, ["erase", str(tmp_path / "c.txt"), "--executor", "spark", "--model", "tiny"])
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("mace-ray: error:"), r.stderr
    assert "'--executor': Value error, 'spark' is not one of 'ray', 'local'" in lines[0]


def test_eval_config_file_supplies_options_and_cli_overrides(tmp_path, monkeypatch):
    import mace_core.evaluation.summary as summary
    import mace_ray.eval.driver as evaluate

    seen = {}

    def fake_run(req):  # option parsing only
        seen["req"] = req
        return {"eval_id": "e", "status": "complete", "output": {"root": str(tmp_path)}}

    monkeypatch.setattr(evaluate, "run_eval", fake_run)
    monkeypatch.setattr(summary, "metrics_table", lambda report: "metrics")
    cfg = tmp_path / "eval.yaml"
    cfg.write_text("model: tiny\nsuite: celebrities\nlimit: 5\nseeds: [1, 2]\ninference-steps: 7\n")
    r = CliRunner().invoke(app, ["eval", "--config", str(cfg), "--limit", "3", "--executor", "local"])
    assert r.exit_code == 0, r.output
    req = seen["req"]
    assert (req.model, req.suite, req.limit, req.seeds) == ("tiny", "celebrities", 3, (1, 2))
    assert req.generation.inference_steps == 7 and req.executor == "local"

    cfg.write_text("model: tiny\nsuite: celebrities\nsteps: 7\n")
    bad = CliRunner().invoke(app, ["eval", "--config", str(cfg)])
    assert bad.exit_code == 2 and "unknown option 'steps'" in bad.stderr


def test_status_reads_a_running_manifest_under_a_dead_lease_as_interrupted(tmp_path):
    """A driver killed outright (SIGKILL, OOM, its node lost) leaves its manifest "running":
    `status` says interrupted once no live lease holds the run, running while one does."""
    import os
    import socket
    import subprocess
    import sys
    import time

    from mace_ray.storage.lease import pid_namespace

    out = tmp_path / "out"
    run = out / "runs" / "0123456789abcdef"
    run.mkdir(parents=True)
    (run / "manifest.json").write_text(json.dumps({"status": "running", "model": "tiny", "concepts": []}))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    (out / "locks").mkdir()

    def lease(pid: int) -> None:
        held = {"owner": "x", "host": socket.gethostname(), "pid": pid, "pidns": pid_namespace()}
        held.update(heartbeat=time.time(), ttl_s=60)
        (out / "locks" / "0123456789abcdef.json").write_text(json.dumps(held))

    def status() -> dict:
        r = CliRunner().invoke(app, ["status", "0123456789abcdef", "--output", str(out)])
        assert r.exit_code == 0, r.output
        return json.loads(r.stdout)

    lease(os.getpid())  # a live driver on this host (this process): still running
    assert status()["status"] == "running"
    lease(int(dead.stdout))  # its process is gone: killed without a word
    shown = status()
    assert shown["status"] == "interrupted" and "no live lease" in shown["error"]
    (out / "locks" / "0123456789abcdef.json").unlink()  # no lease at all
    assert status()["status"] == "interrupted"
