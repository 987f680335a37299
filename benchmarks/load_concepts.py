"""A thousand concepts through the orchestration: what the driver pays per concept.

Tiny model, small data settings (2 images of 4 DPM steps, 4 LoRA steps, 2 templates per
concept, whole-image masks) so that the model work is small and the orchestration shows:
  - executor local: the whole run in one process (the in-process reference);
  - executor ray: a local Ray, ``--workers`` CPU workers (1 CPU each), the Ray start-up
    counted.
Each run is a child process of its own, so that its peak memory is its own. Measured per
run: wall and driver CPU seconds per stage, the driver's peak and final resident memory,
live objects and their bytes in Ray's object store (sampled through the state API), and the
size of what the run keeps (manifest.json, refs.json, report.json, the whole run folder).
From these: the per-concept orchestration overhead against in-process, and a projection
for 10,000 concepts on 64 workers with the GPU per-concept times of ``--gpu-concept-s``.

Usage: python benchmarks/load_concepts.py [--concepts 1000] [--workers 2] [--only local|ray]
                                          [--out benchmarks/results] [--parts DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

# benchmarks/ is on the path when this runs as a script.
from closed_forms import write_result

# Stages whose work is per concept and runs on the workers (the rest is per run).
CONCEPT_STAGES = ("text_statistics", "data", "train", "erasure_report")
MB = 1024**2
WORK = "tiny model: 2 images x 4 DPM steps, 4 LoRA steps, 2 templates, whole-image masks"


def settings() -> Any:
    from mace_core.settings import DataSettings, EraseSettings, MaskSettings, TrainSettings

    return EraseSettings(
        masks=MaskSettings(masker="whole-image"),
        data=DataSettings(images_per_concept=2, inference_steps=4),
        train=TrainSettings(steps=4),
        prompts_per_concept=2,
    )


class Sampler(threading.Thread):
    """The driver's resident memory every 0.5 s and, on Ray, the object store every 5 s."""

    def __init__(self, ray_objects: bool) -> None:
        super().__init__(daemon=True)
        import psutil

        self.proc = psutil.Process()
        self.ray_objects = ray_objects
        self.stop = threading.Event()
        self.peak_rss = 0
        self.objects_peak = 0
        self.object_bytes_peak = 0
        self.object_samples = 0
        self.state_api_error: str | None = None

    def run(self) -> None:
        last = 0.0
        while not self.stop.wait(0.5):
            self.peak_rss = max(self.peak_rss, self.proc.memory_info().rss)
            if self.ray_objects and time.monotonic() - last > 5.0:
                last = time.monotonic()
                self.sample_objects()

    def sample_objects(self) -> None:
        import ray

        if not ray.is_initialized():
            return
        try:
            from ray.util.state import list_objects

            objs = list_objects(limit=10_000, timeout=10, raise_on_missing_output=False)
        except Exception as e:  # the state API is a dashboard service: say so, go on
            self.state_api_error = f"{type(e).__name__}: {e}"[:200]
            return
        self.object_samples += 1
        self.objects_peak = max(self.objects_peak, len(objs))
        size = sum(
            (o.object_size or 0) if hasattr(o, "object_size") else o.get("object_size") or 0 for o in objs
        )
        self.object_bytes_peak = max(self.object_bytes_peak, size)


def one_run(executor: str, n: int, workers: int, root: Path) -> dict[str, Any]:
    """One erase run in this process, measured (the child's side)."""
    import psutil

    import mace_ray.engine.stages as runtime
    from mace_core.concepts import ConceptType
    from mace_ray.erase.driver import run_erase
    from mace_ray.erase.request import EraseRequest

    cpu: dict[str, float] = {}
    rss_after: dict[str, float] = {}
    original = runtime.Timer.stage
    proc = psutil.Process()

    def stage(self: Any, name: str):  # the Timer's stage, plus driver CPU and memory
        return _measured(original(self, name), name)

    class _measured:
        def __init__(self, inner: Any, name: str) -> None:
            self.inner, self.name = inner, name

        def __enter__(self) -> None:
            self.t0 = time.process_time()
            self.inner.__enter__()

        def __exit__(self, *exc: Any) -> Any:
            out = self.inner.__exit__(*exc)
            cpu[self.name] = round(cpu.get(self.name, 0.0) + time.process_time() - self.t0, 3)
            rss_after[self.name] = round(proc.memory_info().rss / MB, 1)
            return out

    runtime.Timer.stage = stage  # type: ignore[method-assign]
    cfile = root / "concepts.txt"
    # Distinct made-up names: real ones would run out, and the model is random anyway.
    cfile.write_text("".join(f"Person Number {i}\n" for i in range(n)))
    kw: dict[str, Any] = {"workers": workers, "gpus_per_worker": 0} if executor == "ray" else {}
    sampler = Sampler(ray_objects=executor == "ray")
    sampler.start()
    cpu0, t0 = time.process_time(), time.perf_counter()
    rep = run_erase(
        EraseRequest(
            str(cfile),
            model="tiny",
            output=str(root / "out"),
            default_type=ConceptType.CELEBRITY,
            settings=settings(),
            executor=executor,
            **kw,
        )
    )
    wall, driver_cpu = time.perf_counter() - t0, time.process_time() - cpu0
    sampler.stop.set()
    sampler.join()
    run_dir = Path(rep["output"]["root"])
    out_root = root / "out"

    def size(p: Path) -> int:
        return p.stat().st_size if p.exists() else 0

    def tree(p: Path) -> tuple[int, int]:
        files = [f for f in p.rglob("*") if f.is_file()]
        return sum(f.stat().st_size for f in files), len(files)

    run_bytes, run_files = tree(run_dir)
    data_bytes, data_files = tree(out_root / "data")
    return {
        "executor": executor,
        "concepts": n,
        "workers": workers if executor == "ray" else 1,
        "wall_s": round(wall, 1),
        "driver_cpu_s": round(driver_cpu, 1),
        "stage_wall_s": rep["seconds"],
        "stage_driver_cpu_s": cpu,
        "driver_rss_after_stage_mb": rss_after,
        "driver_peak_rss_mb": round(
            max(sampler.peak_rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / MB, 1
        ),
        "object_store": {
            "samples": sampler.object_samples,
            "peak_objects": sampler.objects_peak,
            "peak_bytes_mb": round(sampler.object_bytes_peak / MB, 2),
            "state_api_error": sampler.state_api_error,
        }
        if executor == "ray"
        else None,
        "kept": {
            "manifest_json_kb": round(size(run_dir / "manifest.json") / 1024, 1),
            "refs_json_kb": round(size(run_dir / "refs.json") / 1024, 1),
            "report_json_kb": round(size(run_dir / "report.json") / 1024, 1),
            "run_folder_mb": round(run_bytes / MB, 1),
            "run_folder_files": run_files,
            "data_kb": round(data_bytes / 1024, 1),
            "data_files": data_files,
        },
    }


def child(executor: str, n: int, workers: int, parts: Path) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter; its JSON is the last line it prints.

    Each result is kept in ``parts`` as it comes, so that a benchmark stopped half-way
    (hours of CPU at 1,000 concepts) reruns only what is missing."""
    part = parts / f"{executor}_{n}_w{workers}.json"
    if part.exists():
        return json.loads(part.read_text())
    root = Path(tempfile.mkdtemp(prefix=f"mace-load-{executor}-{n}-"))
    try:
        cmd = [sys.executable, __file__, "--one", executor, "--concepts", str(n)]
        cmd += ["--workers", str(workers), "--root", str(root)]
        done = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
        res = json.loads(done.stdout.strip().splitlines()[-1])
        print(
            f"# {executor} x {n}: {res['wall_s']} s, driver peak {res['driver_peak_rss_mb']} MB", flush=True
        )
        parts.mkdir(parents=True, exist_ok=True)
        part.write_text(json.dumps(res, indent=1) + "\n")
        return res
    finally:
        shutil.rmtree(root, ignore_errors=True)


def per_concept(run: dict[str, Any], key: str) -> float:
    return sum(run[key].get(s, 0.0) for s in CONCEPT_STAGES) / run["concepts"]


def project(ray: dict[str, Any], local: dict[str, Any], gpu_concept_s: float) -> dict[str, Any]:
    """10,000 concepts on 64 workers, linear in the concepts from the Ray run.

    Per-concept growth of the driver's memory: its peak less its size once the concept list
    is parsed and the model fingerprinted (after ``prepare``), over the concepts; the kept
    JSON files are taken as per-concept entries (their fixed part is a few kB)."""
    n, w, k = 10_000, 64, ray["concepts"]
    kept = ray["kept"]
    base_mb = ray["driver_rss_after_stage_mb"]["prepare"]
    growth_kb = (ray["driver_peak_rss_mb"] - base_mb) * 1024 / k
    cpu_ms = 1000 * per_concept(ray, "stage_driver_cpu_s")
    # The driver keeps up while its CPU per concept is below the pool's time per concept.
    pool_ms = 1000 * gpu_concept_s / w
    return {
        "concepts": n,
        "workers": w,
        "gpu_seconds_per_concept_assumed": gpu_concept_s,
        "driver_rss_growth_kb_per_concept": round(growth_kb, 1),
        "driver_rss_mb": round(base_mb + growth_kb * n / 1024),
        "manifest_json_mb": round(kept["manifest_json_kb"] * n / k / 1024, 2),
        "report_json_mb": round(kept["report_json_kb"] * n / k / 1024, 2),
        "refs_json_mb": round(kept["refs_json_kb"] * n / k / 1024, 2),
        "run_folder_files": kept["run_folder_files"] * n // k,
        "data_files": kept["data_files"] * n // k,
        "driver_cpu_ms_per_concept": round(cpu_ms, 1),
        "pool_ms_per_concept_at_64_workers": round(pool_ms, 1),
        "driver_busy_fraction": round(cpu_ms / pool_ms, 3),
        "driver_cpu_total_s": round(cpu_ms * n / 1000),
        "pool_wall_h": round(gpu_concept_s * n / w / 3600, 2),
        "in_flight_jobs": f"<= {w} (one per worker), each a job's arguments and its result",
        "local_in_process_h": round(local["wall_s"] / local["concepts"] * n / 3600, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concepts", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=2)
    # Per concept on one H200 at the paper's settings (8 images x 30 steps, Grounded-SAM, 50
    # LoRA steps in concept batches): about 2 + 0.5 + 1 s from the stage measurements.
    ap.add_argument("--gpu-concept-s", type=float, default=3.5)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--parts", default="benchmarks/results/load_concepts_parts", help="each run's figures")
    ap.add_argument("--only", choices=["local", "ray"], help="run only this executor's measurement")
    ap.add_argument("--one", choices=["local", "ray"], help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if args.one:
        res = one_run(args.one, args.concepts, args.workers, Path(args.root))
        print(json.dumps(res))
        return
    import torch

    parts = Path(args.parts)
    runs = {
        e: child(e, args.concepts, args.workers, parts)
        for e in (["ray", "local"] if not args.only else [args.only])
    }
    if args.only:
        return
    ray, local = runs["ray"], runs["local"]
    res: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU",
        "torch": torch.__version__,
        "work_per_concept": WORK,
        "runs": [ray, local],
        "per_concept_s": {
            "local_wall": round(local["wall_s"] / local["concepts"], 3),
            "ray_wall": round(ray["wall_s"] / ray["concepts"], 3),
            "ray_over_local": round(ray["wall_s"] / local["wall_s"], 2),
            "local_concept_stages": round(per_concept(local, "stage_wall_s"), 3),
            "ray_concept_stages": round(per_concept(ray, "stage_wall_s"), 3),
            "ray_driver_cpu_concept_stages": round(per_concept(ray, "stage_driver_cpu_s"), 4),
        },
        "projection": project(ray, local, args.gpu_concept_s),
    }
    write_result(res, args.out, f"load_concepts_cpu_{args.concepts}.json")


if __name__ == "__main__":
    main()
