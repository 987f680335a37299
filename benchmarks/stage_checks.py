"""What the stages' declared checks cost on a run of many concepts (mace_ray/engine/declared.py).

Lays out the files an erase run of N concepts has stored (each concept's statistics, LoRA,
notes and DONE; its data folder with images, masks and data.json under the shared data/;
M and the prior) in a local folder, or also in a SeaweedFS S3 server on 127.0.0.1
(``--s3``), then times the checks ``run_stages`` makes at each stage boundary of a full run
(a stage's marker and the next stage's inputs from one ``Presence``), against asking for
every key with one request each (16 at a time, as S3 has no batch HEAD).

    python benchmarks/stage_checks.py --concepts 1000 --s3
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from mace_ray.engine.declared import Presence
from mace_ray.storage.base import Storage
from mace_ray.storage.local import LocalStorage
from mace_ray.storage.open_store import open_storage

ROOT = Path(__file__).resolve().parents[1]
RUN = "runs/0123456789abcdef"


def layout(n: int, images: int) -> dict[str, list[str]]:
    """The keys an erase run of ``n`` concepts leaves, by what each stage checks."""
    slugs = [f"concept-{i:05d}-{i * 7919 % 10**8:08x}" for i in range(n)]
    data = [f"data/{(i * 2654435761) % 16**24:024x}" for i in range(n)]
    concept = lambda name: [f"{RUN}/concepts/{s}/{name}" for s in slugs]  # noqa: E731
    return {
        "stats": concept("stats.safetensors")
        + ["cache/prior/abc.safetensors", f"{RUN}/cfr/domain.safetensors"],
        "data": [f"{d}/data.json" for d in data],
        "pixels": [
            f"{d}/{kind}/{j:03d}.png" for d in data for kind in ("images", "masks") for j in range(images)
        ],
        "M": [f"{RUN}/cfr/M.safetensors"],
        "done": concept("DONE"),
        "lora": concept("lora.safetensors"),
        "notes": concept("notes.json"),
        "final": [f"{RUN}/final/erasure.safetensors", f"{RUN}/final/cfr.safetensors"],
        "report": [f"{RUN}/report.json", f"{RUN}/manifest.json"],
    }


def boundaries(k: dict[str, list[str]]) -> list[tuple[str, list[str], bool, list[str]]]:
    """(stage, its marker, whether that is scattered, the next stage's inputs) of a full
    erase run, in order (mace_ray/erase/stages.py)."""
    return [
        ("text_statistics", k["stats"], False, []),
        ("data", k["data"], True, []),
        ("cfr", k["M"], False, k["M"]),
        ("train", k["done"], False, k["done"] + k["stats"][:-2] + k["M"]),
        ("write", k["final"], False, k["done"]),
        ("erasure_report", [], False, k["done"]),
        ("finish", k["report"], False, []),
    ]


def fill(storage: Storage, keys: list[str]) -> float:
    t = time.perf_counter()
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(lambda key: storage.write_bytes(key, b"x"), keys))
    return time.perf_counter() - t


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def one_request_each(storage: Storage, keys: list[str]) -> list[bool]:
    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(storage.exists, keys))


def measure(storage: Storage, k: dict[str, list[str]]) -> dict[str, Any]:
    """The checks of a whole run through one Presence, as run_stages makes them."""
    rows: dict[str, Any] = {}
    presence = Presence(storage)
    for stage, marker, scattered, next_reads in boundaries(k):
        before = presence.requests
        presence.look()
        dt, missing = timed(
            lambda: presence.missing(marker, listing=not scattered) + presence.missing(next_reads)  # noqa: B023
        )
        assert not missing, missing[:3]
        keys = marker + next_reads
        one_each, _ = timed(lambda: one_request_each(storage, keys))  # noqa: B023
        rows[stage] = {"keys": len(keys), "requests": presence.requests - before, "seconds": round(dt, 3),
                       "one_request_each_seconds": round(one_each, 3)}  # fmt: skip
    stages = list(rows.values())
    rows["total_seconds"] = round(sum(r["seconds"] for r in stages), 3)
    rows["one_request_each_total_seconds"] = round(sum(r["one_request_each_seconds"] for r in stages), 3)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concepts", type=int, default=1000)
    ap.add_argument("--images", type=int, default=8, help="images (and masks) per concept")
    ap.add_argument("--s3", action="store_true", help="also on a SeaweedFS S3 server on 127.0.0.1")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    k = layout(args.concepts, args.images)
    every = [key for keys in k.values() for key in keys]
    result: dict[str, Any] = {"concepts": args.concepts, "stored_keys": len(every)}
    with tempfile.TemporaryDirectory() as tmp:
        local = LocalStorage(Path(tmp) / "out")
        result["local_fill_seconds"] = round(fill(local, every), 1)
        result["local"] = measure(local, k)
        if args.s3:
            sys.path.insert(0, str(ROOT / "tests"))
            from s3server import S3Server

            server = S3Server(Path(tmp) / "s3")
            server.start()
            try:
                import os

                os.environ.update(server.env())
                bucket = server.create_bucket("stage-checks")
                s3 = open_storage(f"s3://{bucket}/out", s3_endpoint=server.endpoint)
                result["s3_fill_seconds"] = round(fill(s3, every), 1)
                result["s3"] = measure(s3, k)
            finally:
                server.stop()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"stage_checks_{args.concepts}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
