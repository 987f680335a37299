"""The benchmarks run end to end on the tiny models (their figures are never asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_benchmark(script: str, *args: str) -> None:
    """``benchmarks/<script> args`` as a user runs it, from the repository root; it must succeed."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_speed_benchmark_writes_both_paths(tmp_path):
    args = ["--concepts", "3", "--reference-concepts", "1", "--k", "auto", "--images", "1"]
    run_benchmark("speed.py", *args, "--steps", "1", "--train-steps", "1", "--out", str(tmp_path))
    res = json.loads((tmp_path / "speed_tiny_cpu.json").read_text())
    assert res["status"] == "complete" and res["concepts"] == {"reference": 1, "fast": 3}
    assert set(res["projection_1000_concepts_8_devices_minutes"]) == {"reference", "fast"}
    assert res["k"] == 4 and res["batch_plan"]["concepts_per_batch"] == 4  # auto on a CPU
    for path in ("reference", "fast"):
        stages = res["seconds_per_concept"][path]
        assert {"load", "generate", "mask", "train", "total"} <= stages.keys()
        assert all(v > 0 for v in stages.values())
    assert set(res["reference_over_fast"]) >= {"train", "total"}


def test_mmdit_memory_benchmark_runs_the_worker_on_the_tiny_flux_pipeline(tmp_path):
    run_benchmark("mmdit_memory.py", "--out", str(tmp_path))
    res = json.loads((tmp_path / "mmdit_memory_tiny_cpu.json").read_text())
    assert res["precision"] == "auto" and res["mixed_precision"] is False  # a CPU: fp32 throughout
    assert set(res["components"]) == {"vae", "text_encoder", "text_encoder_2", "transformer"}
    assert all(c["dtypes"] == ["float32"] and c["parameters"] > 0 for c in res["components"].values())
    assert res["peak_gb"] == {"load": None, "generate": None, "train": None} and res["losses_finite"]
    assert set(res["seconds"]) == {"build", "load", "generate", "train"}
