"""Concepts per minute on one machine: single process vs local Ray, and the cost of resuming.

Tiny model, the paper's per-concept work at the local default (8 images x 30 DPM-Solver
steps, 50 LoRA steps), the same concepts for every executor, measured in one run:
  - executor local (one process),
  - executor ray with a local Ray and 2 CPU workers (the Ray start-up counted),
  - resuming a run whose concepts are all DONE but whose final model is not written,
  - rerunning a complete run.

Usage: python benchmarks/ray_overhead.py [--concepts 8] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from mace_core.concepts import ConceptType
from mace_core.settings import EraseSettings, MaskSettings
from mace_ray.erase.driver import run_erase
from mace_ray.erase.request import EraseRequest

NAMES = [
    "Bill Clinton", "Tom Hanks", "Angelina Jolie", "Taylor Swift", "Barack Obama", "Emma Watson",
    "Brad Pitt", "Oprah Winfrey", "Elon Musk", "Lionel Messi", "Serena Williams", "Keanu Reeves",
]  # fmt: skip


def timed(req: EraseRequest) -> tuple[float, dict]:
    t = time.perf_counter()
    rep = run_erase(req)
    return time.perf_counter() - t, rep


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concepts", type=int, default=8)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    tmp = Path(tempfile.mkdtemp(prefix="mace-bench-"))
    cfile = tmp / "concepts.txt"
    cfile.write_text("\n".join(NAMES[: args.concepts]) + "\n")
    # Masks are whole-image here: this measures orchestration, not the masker.
    settings = EraseSettings(masks=MaskSettings(masker="whole-image"))

    def req(out: str, **kw) -> EraseRequest:
        return EraseRequest(
            str(cfile),
            model="tiny",
            output=str(tmp / out),
            default_type=ConceptType.CELEBRITY,
            settings=settings,
            concepts_per_batch=1,
            **kw,
        )

    k = args.concepts
    res: dict[str, object] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU",
        "torch": torch.__version__,
        "concepts": k,
        "work_per_concept": "8 images x 30 steps, 50 LoRA steps, tiny model",
    }
    t_local, _ = timed(req("local", executor="local"))
    t_ray, rep = timed(req("ray", executor="ray", workers=2, gpus_per_worker=0))
    res["local_s"] = round(t_local, 1)
    res["ray_2_workers_s"] = round(t_ray, 1)
    res["local_concepts_per_min"] = round(60 * k / t_local, 2)
    res["ray_concepts_per_min"] = round(60 * k / t_ray, 2)
    res["ray_over_local_time_ratio"] = round(t_ray / t_local, 2)
    res["ray_stage_seconds"] = rep["seconds"]

    # All concepts DONE, final model missing (a driver killed after training): resume.
    root = Path(rep["output"]["root"])
    shutil.rmtree(root / "final")
    (root / "report.json").unlink()
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["status"] = "running"
    (root / "manifest.json").write_text(json.dumps(manifest))
    t_resume, rep2 = timed(req("ray", executor="ray", workers=2, gpus_per_worker=0))
    res["resume_all_done_ray_s"] = round(t_resume, 1)
    res["resume_all_done_stage_seconds"] = rep2["seconds"]
    t_complete, _ = timed(req("ray", executor="ray", workers=2, gpus_per_worker=0))
    res["rerun_complete_run_s"] = round(t_complete, 2)
    print(json.dumps(res, indent=1))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ray_overhead_cpu.json").write_text(json.dumps(res, indent=1) + "\n")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
