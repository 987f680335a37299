"""Throughput of S3Storage.put_dir / get_dir against a local disk copy, in one run.

A diffusers-like folder (SD 1.x proportions scaled to --size-gb: UNet, text encoder, VAE as
valid safetensors files of random bytes, plus small JSON configs) is
  - copied on local disk with shutil.copytree (the baseline),
  - uploaded with S3Storage.put_dir (multipart, parallel) and downloaded with get_dir,
to a SeaweedFS `weed mini` on 127.0.0.1 started for the run (tests/s3server.py), or to
--endpoint with the AWS_* credentials of the environment. Each is repeated --repeat times;
the best and median MB/s are reported, with the ratios to the local copy.
The source files stay in the page cache, so the figures compare the write paths.

Usage: python benchmarks/s3_throughput.py [--size-gb 1] [--repeat 3] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import boto3

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the test suite's SeaweedFS launcher

from s3server import S3Server, weed_binary  # noqa: E402

from mace_ray.storage import s3 as s3storage  # noqa: E402
from mace_ray.storage.s3 import S3Storage  # noqa: E402

MB = 1024 * 1024
# SD 1.x fp16 component sizes (MB): UNet 1640, text encoder 235, VAE 160; scaled to --size-gb.
COMPONENTS = {
    "unet/diffusion_pytorch_model.safetensors": 1640,
    "text_encoder/model.safetensors": 235,
    "vae/diffusion_pytorch_model.safetensors": 160,
}
CONFIGS = ["model_index.json", "unet/config.json", "text_encoder/config.json", "vae/config.json"]


def write_safetensors(path: Path, nbytes: int) -> None:
    """A valid safetensors file: one uint8 tensor of random bytes, written in chunks."""
    header = json.dumps({"w": {"dtype": "U8", "shape": [nbytes], "data_offsets": [0, nbytes]}}).encode()
    header += b" " * (-len(header) % 8)  # the format pads the header to 8 bytes
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        left = nbytes
        while left:
            n = min(left, 64 * MB)
            f.write(os.urandom(n))
            left -= n


def make_folder(root: Path, size_gb: float) -> int:
    total_mb = sum(COMPONENTS.values())
    for rel, mb in COMPONENTS.items():
        write_safetensors(root / rel, int(size_gb * 1024 * MB * mb / total_mb))
    for rel in CONFIGS:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(json.dumps({"_class_name": rel.split("/")[0]}))
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def timed(fn: Callable[[], None], before: Callable[[], None]) -> float:
    before()
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def summary(seconds: list[float], nbytes: int) -> dict[str, float | list[float]]:
    rates = [nbytes / MB / s for s in seconds]
    return {
        "seconds": [round(s, 3) for s in seconds],
        "best_MBps": round(max(rates), 1),
        "median_MBps": round(statistics.median(rates), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-gb", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--endpoint", help="an existing S3 endpoint (default: start weed mini here)")
    ap.add_argument("--bucket", help="bucket at --endpoint (default: a new one on the local server)")
    ap.add_argument("--workdir", help="scratch folder (default: a temporary one)")
    ap.add_argument(
        "--chunk-mb", type=int, default=s3storage.MULTIPART_CHUNK // MB, help="multipart part size"
    )
    ap.add_argument("--concurrency", type=int, default=s3storage.CONCURRENCY, help="parallel requests")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory(prefix="s3bench-", dir=args.workdir) as tmp:
        work = Path(tmp)
        src = work / "src"
        nbytes = make_folder(src, args.size_gb)
        files = sum(1 for p in src.rglob("*") if p.is_file())
        print(f"folder: {files} files, {nbytes / MB:.0f} MB")

        server = None
        if args.endpoint:
            endpoint, bucket = args.endpoint, args.bucket
            if not bucket:
                ap.error("--endpoint needs --bucket")
        else:
            server = S3Server(work / "s3")
            server.start()
            endpoint = server.endpoint
            os.environ.update(server.env())
            bucket = server.create_bucket(f"bench-{uuid.uuid4().hex[:8]}")
        try:
            storage = S3Storage(
                f"s3://{bucket}/bench",
                endpoint,
                multipart_threshold=args.chunk_mb * MB,
                multipart_chunksize=args.chunk_mb * MB,
                concurrency=args.concurrency,
            )
            dst = work / "dst"

            def clear_dst() -> None:
                shutil.rmtree(dst, ignore_errors=True)

            copy = [timed(lambda: shutil.copytree(src, dst), clear_dst) for _ in range(args.repeat)]
            up = [timed(lambda: storage.put_dir(src, "pipeline"), lambda: None) for _ in range(args.repeat)]
            down = [timed(lambda: storage.get_dir("pipeline", dst), clear_dst) for _ in range(args.repeat)]
            got = sum(p.stat().st_size for p in dst.rglob("*") if p.is_file())
            assert got == nbytes, (got, nbytes)
            storage.delete_prefix("pipeline")
        finally:
            if server is not None:
                server.stop()

    res = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
        "server": "weed mini on 127.0.0.1 (same machine)" if server is not None else f"{endpoint} (remote)",
        "weed": subprocess.run([weed_binary(), "version"], capture_output=True, text=True).stdout.strip()
        if server is not None
        else None,
        "boto3": boto3.__version__,
        "transfer": {
            "multipart_threshold_MB": args.chunk_mb,
            "multipart_chunk_MB": args.chunk_mb,
            "concurrency": args.concurrency,
        },
        "load_average_before": [round(x, 2) for x in load_before],
        "folder": {"files": files, "MB": round(nbytes / MB, 1)},
        "repeat": args.repeat,
        "local_copytree": summary(copy, nbytes),
        "s3_upload_put_dir": summary(up, nbytes),
        "s3_download_get_dir": summary(down, nbytes),
    }
    base = res["local_copytree"]["median_MBps"]
    res["ratio_to_local_copy_median"] = {
        "upload": round(res["s3_upload_put_dir"]["median_MBps"] / base, 3),
        "download": round(res["s3_download_get_dir"]["median_MBps"] / base, 3),
    }
    for name in ("local_copytree", "s3_upload_put_dir", "s3_download_get_dir"):
        r = res[name]
        print(
            f"{name:22s} best {r['best_MBps']:8.1f} MB/s  median {r['median_MBps']:8.1f} MB/s  {r['seconds']}"
        )
    print(f"ratio to local copy (median): {res['ratio_to_local_copy_median']}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    default = (args.chunk_mb, args.concurrency) == (s3storage.MULTIPART_CHUNK // MB, s3storage.CONCURRENCY)
    suffix = "" if default else f"_chunk{args.chunk_mb}_c{args.concurrency}"
    path = out / f"s3_throughput_cpu_{args.size_gb:g}gb{suffix}.json"
    path.write_text(json.dumps(res, indent=1) + "\n")
    print(f"saved {path}")


if __name__ == "__main__":
    main()
