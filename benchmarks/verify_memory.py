"""Driver memory while verifying a large stored file on S3: hashing it whole (what a rerun of a
complete run did: ``sha256(storage.read_bytes(key))``) against ``S3Storage.digest`` (streamed
in 1 MiB chunks). Each in a fresh process; the figure is the growth of its peak RSS
(``ru_maxrss``) over the RSS it had once the storage was open.

A SeaweedFS `weed mini` on 127.0.0.1 is started for the run (tests/s3server.py) and one object
of --size-mb random bytes uploaded to it.

Usage: python benchmarks/verify_memory.py [--size-mb 1024] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the test suite's SeaweedFS launcher

from s3server import S3Server  # noqa: E402

CHILD = r"""
import hashlib, json, resource, sys, time
from mace_ray.storage.s3 import S3Storage
s = S3Storage(sys.argv[1], sys.argv[2])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.monotonic()
if sys.argv[3] == "whole":
    digest = hashlib.sha256(s.read_bytes("big.bin")).hexdigest()
else:
    digest = s.digest("big.bin")
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"sha256": digest, "rss_open_mb": base / 1024, "peak_growth_mb": (peak - base) / 1024,
                  "seconds": time.monotonic() - t}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=1024)
    results = str(REPO / "benchmarks" / "results")
    ap.add_argument("--out", default=results, help="folder for the JSON ('': none)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="verify-memory-") as tmp:
        root = Path(tmp)
        server = S3Server(root / "s3")
        server.start()
        try:
            env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MACE_S3_"))}
            env |= {**server.env(), "PYTHONPATH": str(REPO)}
            bucket = server.create_bucket("verify-memory")
            big, h = root / "big.bin", hashlib.sha256()
            with open(big, "wb") as f:
                for _ in range(args.size_mb):
                    chunk = os.urandom(1 << 20)
                    h.update(chunk)
                    f.write(chunk)
            server.client().upload_file(str(big), bucket, "x/big.bin")
            big.unlink()
            out = {"size_mb": args.size_mb}
            for how in ("whole", "streamed"):
                proc = subprocess.run(
                    [sys.executable, "-c", CHILD, f"s3://{bucket}/x", server.endpoint, how],
                    env=env,
                    capture_output=True,
                    text=True,
                    check=True,
                )
                out[how] = json.loads(proc.stdout.strip().splitlines()[-1])
                assert out[how].pop("sha256") == h.hexdigest()
            out["machine"] = {
                "platform": platform.platform(),
                "cpus": os.cpu_count(),
                "load": os.getloadavg(),
            }
            print(json.dumps(out, indent=1))
            if args.out:
                dest = Path(args.out) / f"verify_memory_cpu_{args.size_mb}mb.json"
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_text(json.dumps(out, indent=1) + "\n")
                print(f"wrote {dest}")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
