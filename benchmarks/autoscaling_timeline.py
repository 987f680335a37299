"""Autoscaling for real on one machine: `mace-ray erase` on Ray's fake multi-node autoscaler.

Starts the cluster of cluster/fake-autoscaler.yaml (`RAY_FAKE_CLUSTER=1 ray start --head
--autoscaling-config ...`: a head with 1 CPU and no GPU, GPU nodes of 1 CPU + 1 fake GPU from
0 to 2, idle after 15 s), runs `mace-ray erase --executor ray --workers 2 --gpus-per-worker 1`
of 4 concepts of the tiny model against it as a subprocess, and samples the cluster's nodes
every 0.5 s (through the GCS, without joining the cluster) and the driver's stage lines,
then keeps sampling until the GPU nodes are gone or a bound. The same inputs run once with
`--executor local` first; the two final weights must agree (float rounding).

Writes the timeline (nodes added and removed, with their type; stages started and done; the
driver asking for GPU workers), which GPU nodes were alive in each stage, the time from the
request to the first GPU node, from the end of the run to the last GPU node's removal, and
the checksums of both runs' weights.

Only the processes this script starts are stopped: the `ray start --block` process and
everything in its session (the head's processes and the nodes the autoscaler started).

Usage: python benchmarks/autoscaling_timeline.py [--bound 180] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "cluster" / "fake-autoscaler.yaml"
BIN = Path(sys.executable).parent
HEAD_TYPE = "ray.head.default"  # the fake provider's fixed name for the head
# The concepts and settings of tests/helpers.py (CONCEPTS, FLAGS): the test compares this
# run with the suite's local reference run of the same inputs.
CONCEPTS = "Bill Clinton | celebrity\nVan Gogh | style\nairplane | object | sky\nAngelina Jolie | celebrity\n"
FLAGS = [
    "--model", "tiny", "--images", "2", "--inference-steps", "3", "--train-steps", "3",
    "--prompts-per-concept", "4", "--masker", "whole-image",
]  # fmt: skip
WORKERS = 2
# The stages whose work runs on GPU workers (mace_ray.erase.stages, Placement.GPU).
GPU_STAGES = ("workers_start", "data", "train", "write", "erasure_report")
SAMPLE_EVERY_S = 0.5
STAGE_LINE = re.compile(r"stage (\w+): (started|done in ([0-9.]+)s)")
# mace_ray.storage.probe: no node holds a worker, so the driver asks the autoscaler for nodes.
ASK_LINE = re.compile(r"asking (.+) for (\d+) worker\(s\)")
WORKERS_LINE = re.compile(r"(?<!text )workers: (\d+) x (.+) \(ray executor\)")  # workers_start
# The v1 autoscaler's decisions (monitor.log): a launch queued, a node terminated.
MONITOR_LAUNCH = re.compile(r"^(\S+ \S+)\s.*StandardAutoscaler: Queue (\d+) new nodes for launch")
MONITOR_TERMINATE = re.compile(
    r"^(\S+ \S+)\s.*StandardAutoscaler: Terminating the node with id (\w+).*\((\w+)\)"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_env() -> dict[str, str]:
    """This venv first on PATH (the fake nodes and workers run its Python), auth off, and
    no RAY_ADDRESS of the caller's."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_AUTH_MODE"] = "disabled"
    env.pop("RAY_ADDRESS", None)
    return env


def mace_ray() -> list[str]:
    exe = BIN / "mace-ray"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "mace_ray.cli.main"]


# ------------------------------------------------------------------ the fake cluster


def session_pids(sid: int) -> list[int]:
    """Live (not zombie) processes of session ``sid``: what `ray start` in that session started."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        if fields[0] != "Z" and int(fields[3]) == sid:
            out.append(int(d.name))
    return out


class FakeCluster:
    """`RAY_FAKE_CLUSTER=1 ray start --head --block --autoscaling-config <config>` in a session
    of its own, on free ports, in a temp dir; ``stop`` ends every process of that session."""

    def __init__(self, config: Path = CONFIG) -> None:
        self.config = yaml.safe_load(Path(config).read_text())
        self.dir = Path(tempfile.mkdtemp(prefix="fa-", dir="/tmp"))  # short: Ray's unix sockets
        self.proc: subprocess.Popen | None = None
        self.address = ""
        self._log: Any = None

    def start(self, timeout: float = 120.0) -> str:
        import ray._private.services as services

        port = free_port()
        self.address = f"{services.get_node_ip_address()}:{port}"
        cfg = dict(self.config)
        # The provider starts worker nodes against this GCS (default: port 6379 of this machine).
        cfg["provider"] = {**cfg["provider"], "gcs_address": self.address}
        config = self.dir / "autoscaler.yaml"
        config.write_text(yaml.safe_dump(cfg))
        head = cfg["available_node_types"][HEAD_TYPE]["resources"]
        cmd = [
            str(BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
            f"--port={port}", f"--autoscaling-config={config}",
            f"--num-cpus={head.get('CPU', 0)}", f"--num-gpus={head.get('GPU', 0)}",
            f"--object-store-memory={head.get('object_store_memory', 100_000_000)}",
            "--include-dashboard=false", f"--dashboard-port={free_port()}",
            f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}", f"--metrics-export-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--temp-dir={self.dir / 'rt'}",
        ]  # fmt: skip
        env = ray_env()
        env.update({"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"})
        self._log = open(self.dir / "head.log", "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        gcs = None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited {self.proc.returncode}:\n{self.head_log()[-3000:]}")
            try:
                gcs = gcs or gcs_client(self.address)
                # Ready when the monitor has reported the head: the driver reads that report
                # to know that an autoscaler can add the GPU nodes it needs.
                raw = gcs.internal_kv_get(b"__autoscaling_status", None, timeout=2)
                report = (json.loads(raw).get("autoscaler_report") or {}) if raw else {}
                if (report.get("active_nodes") or {}).get(HEAD_TYPE):
                    return self.address
            except Exception:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the fake cluster did not come up in {timeout:.0f}s:\n{self.head_log()[-3000:]}")

    def head_log(self) -> str:
        p = self.dir / "head.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def monitor_log(self) -> str:
        p = self.dir / "rt" / "session_latest" / "logs" / "monitor.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def stop(self) -> None:
        """SIGTERM to `ray start --block` (it stops the head's processes), then SIGKILL to
        whatever of its session is left: fake nodes and their workers. Nothing else."""
        if self.proc is None:
            return
        sid = self.proc.pid
        if self.proc.poll() is None:
            os.killpg(sid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(sid, signal.SIGKILL)
                self.proc.wait()
        deadline = time.monotonic() + 10
        while (left := session_pids(sid)) and time.monotonic() < deadline:
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.5)
        if left:
            print(f"warning: processes {left} of the fake cluster survived SIGKILL", file=sys.stderr)
        self.proc = None
        if self._log is not None:
            self._log.close()

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> FakeCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def gcs_client(address: str) -> Any:
    from ray._raylet import GcsClient

    return GcsClient(address=address)


# ------------------------------------------------------------------ sampling


class NodeSampler(threading.Thread):
    """Every ``every`` s: the cluster's nodes from the GCS (alive or dead, type, start and end
    times), and which GPU nodes are alive then (seconds since ``t0``, a time.time())."""

    def __init__(self, address: str, t0: float, every: float = SAMPLE_EVERY_S) -> None:
        super().__init__(daemon=True)
        self.gcs = gcs_client(address)
        self.t0, self.every = t0, every
        self.nodes: dict[str, dict[str, Any]] = {}
        self.samples: list[dict[str, Any]] = []
        self.errors = 0
        self._halt = threading.Event()

    def sample(self) -> None:
        t = time.time() - self.t0
        infos = self.gcs.get_all_node_info(timeout=5)
        alive_gpu = []
        for info in infos.values():
            node_id = info.node_id.hex()
            res = dict(info.resources_total)
            kind = HEAD_TYPE if info.is_head_node else (info.node_type_name or "?")
            alive = info.state == 0  # GcsNodeInfo.ALIVE
            n = self.nodes.setdefault(node_id, {"node_id": node_id, "node_type": kind, "first_seen": t})
            n["gpus"] = res.get("GPU", 0.0)
            n["alive"] = alive
            n["added"] = round(info.start_time_ms / 1000 - self.t0, 2) if info.start_time_ms else None
            n["removed"] = round(info.end_time_ms / 1000 - self.t0, 2) if info.end_time_ms else None
            if not alive and "last_seen_alive" not in n:
                n["last_seen_alive"] = n.get("seen_alive")
            if alive:
                n["seen_alive"] = t
            if alive and n["gpus"] > 0:
                alive_gpu.append(node_id)
        self.samples.append({"t": round(t, 2), "gpu_nodes": sorted(alive_gpu)})

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                self.sample()
            except Exception:
                self.errors += 1
            self._halt.wait(self.every)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)
        self.sample()  # the final state, after the thread

    def gpu_nodes(self) -> list[dict[str, Any]]:
        return [n for n in self.nodes.values() if n["gpus"] > 0]


class DriverLog(threading.Thread):
    """The driver's stderr, line by line, each with its arrival time (seconds since ``t0``)."""

    def __init__(self, stream: Any, t0: float, copy_to: Path) -> None:
        super().__init__(daemon=True)
        self.stream, self.t0, self.copy_to = stream, t0, copy_to
        self.lines: list[tuple[float, str]] = []

    def run(self) -> None:
        with open(self.copy_to, "w") as f:
            for line in self.stream:
                self.lines.append((round(time.time() - self.t0, 2), line.rstrip("\n")))
                f.write(line)
                f.flush()

    def events(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for t, line in self.lines:
            if m := STAGE_LINE.search(line):
                if m.group(2) == "started":
                    out.append({"t": t, "event": "stage started", "stage": m.group(1)})
                else:
                    ev = {"t": t, "event": "stage done", "stage": m.group(1), "seconds": float(m.group(3))}
                    out.append(ev)
            elif m := ASK_LINE.search(line):
                out.append(
                    {"t": t, "event": "gpu workers asked", "count": int(m.group(2)), "by": "preflight"}
                )
            elif m := WORKERS_LINE.search(line):
                out.append(
                    {"t": t, "event": "gpu workers asked", "count": int(m.group(1)), "by": "workers_start"}
                )
        return out

    def tail(self, n: int = 40) -> str:
        return "\n".join(line for _, line in self.lines[-n:])


# ------------------------------------------------------------------ weights


def read_weights(root: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(Path(root) / "final" / "erasure.safetensors"))


def checksum(tensors: dict[str, Any]) -> str:
    """sha256 over the tensors in key order (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.cpu().numpy().tobytes())
    return h.hexdigest()


def compare(a: dict[str, Any], b: dict[str, Any], atol: float = 1e-5) -> dict[str, Any]:
    import torch

    same_keys = a.keys() == b.keys()
    diff = max(((a[k] - b[k]).abs().max().item() for k in a), default=0.0) if same_keys else None
    close = same_keys and all(torch.allclose(a[k], b[k], atol=atol, rtol=0) for k in a)
    return {"allclose": close, "atol": atol, "max_abs_diff": diff, "same_keys": same_keys}


def run_root(output: Path) -> Path:
    roots = sorted(Path(output).glob("runs/*"))
    if len(roots) != 1:
        raise RuntimeError(f"expected one run under {output}, found {roots}")
    return roots[0]


# ------------------------------------------------------------------ the measurement


def erase_cmd(concepts: Path, output: Path, *extra: str) -> list[str]:
    return [*mace_ray(), "erase", str(concepts), "--output", str(output), *FLAGS, *extra]


def local_run(concepts: Path, output: Path, timeout: float = 900) -> float:
    t = time.perf_counter()
    proc = subprocess.run(
        erase_cmd(concepts, output, "--executor", "local"),
        env=ray_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"the local run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t


def ray_run(cluster: FakeCluster, concepts: Path, output: Path, bound_s: float, erase_timeout: float) -> dict:
    """The erase against the fake cluster, sampled; then sampling until no GPU node is left
    or ``bound_s`` seconds after the driver exited."""
    cmd = erase_cmd(
        concepts, output, "--executor", "ray", "--address", cluster.address,
        "--workers", str(WORKERS), "--gpus-per-worker", "1",
    )  # fmt: skip
    t0 = time.time()
    sampler = NodeSampler(cluster.address, t0)
    sampler.start()
    proc = subprocess.Popen(
        cmd, env=ray_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, errors="replace"
    )
    driver = DriverLog(proc.stderr, t0, cluster.dir / "driver.log")
    driver.start()
    try:
        rc = proc.wait(timeout=erase_timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        driver.join(timeout=10)
        sampler.stop()
        raise RuntimeError(f"the erase did not finish in {erase_timeout:.0f}s:\n{driver.tail()}") from None
    t_end = time.time() - t0
    driver.join(timeout=10)
    # Scale-down: the autoscaler removes the GPU nodes once idle for idle_timeout_minutes.
    while time.time() - t0 - t_end < bound_s:
        if sampler.gpu_nodes() and not sampler.samples[-1]["gpu_nodes"]:
            break
        if rc != 0 and not sampler.gpu_nodes():
            break  # failed before any GPU node came: nothing to wait for
        time.sleep(SAMPLE_EVERY_S)
    sampler.stop()
    return {"rc": rc, "t_end": round(t_end, 2), "driver": driver, "sampler": sampler}


def monitor_events(log: str, t0: float) -> list[dict[str, Any]]:
    """The autoscaler's launches and terminations from its monitor.log (local time, ms)."""
    out: list[dict[str, Any]] = []

    def t(stamp: str) -> float:
        day, ms = stamp.split(",")
        return round(time.mktime(time.strptime(day, "%Y-%m-%d %H:%M:%S")) + int(ms) / 1000 - t0, 2)

    for line in log.splitlines():
        if m := MONITOR_LAUNCH.search(line):
            out.append({"t": t(m.group(1)), "event": "autoscaler queued launch", "count": int(m.group(2))})
        elif m := MONITOR_TERMINATE.search(line):
            ev = {"t": t(m.group(1)), "event": "autoscaler terminates", "node_id": m.group(2)}
            out.append({**ev, "why": m.group(3)})
    return out


def analyse(run: dict, monitor_log: str, bound_s: float) -> dict[str, Any]:
    """The timeline and its figures from the sampled nodes, the driver's lines and the
    autoscaler's log. Times are seconds since the driver was started."""
    sampler: NodeSampler = run["sampler"]
    driver: DriverLog = run["driver"]
    t_end = run["t_end"]
    events = driver.events() + monitor_events(monitor_log, sampler.t0)
    for n in sampler.nodes.values():
        if n["node_type"] == HEAD_TYPE:
            continue
        added = n["added"] if n["added"] is not None else n["first_seen"]
        events.append(
            {"t": added, "event": "node added", "node_type": n["node_type"], "node_id": n["node_id"]}
        )
        if not n["alive"]:
            removed = n["removed"] if n["removed"] is not None else n.get("last_seen_alive")
            ev = {"t": removed, "event": "node removed", "node_type": n["node_type"], "node_id": n["node_id"]}
            events.append(ev)
    events.append({"t": t_end, "event": "driver exited", "rc": run["rc"]})
    events.sort(key=lambda e: (e["t"] is None, e["t"] or 0.0))

    gpu = sampler.gpu_nodes()
    stages: dict[str, dict[str, Any]] = {}
    for e in events:
        if e["event"] == "stage started":
            stages[e["stage"]] = {"started": e["t"], "gpu_stage": e["stage"] in GPU_STAGES}
        elif e["event"] == "stage done" and e["stage"] in stages:
            s = stages[e["stage"]]
            a, b = s["started"], e["t"]
            s["done"], s["seconds"] = b, e["seconds"]
            # GPU nodes alive at some time in [a, b], and those that joined in it.
            s["gpu_nodes_alive"] = sorted(
                n["node_id"] for n in gpu if n["added"] <= b and (n["removed"] is None or n["removed"] >= a)
            )
            s["gpu_nodes_added"] = sorted(n["node_id"] for n in gpu if a <= n["added"] <= b)
    asks = [e for e in events if e["event"] == "gpu workers asked"]
    first_ask = asks[0]["t"] if asks else stages.get("workers_start", {}).get("started")
    ws = stages.get("workers_start", {}).get("started")
    last_done = max((s["done"] for s in stages.values() if "done" in s), default=None)
    added = sorted(n["added"] for n in gpu)
    removed = [n["removed"] for n in gpu]
    all_removed = bool(gpu) and all(r is not None for r in removed)
    last_removed = max(removed) if all_removed else None

    def since(a: float | None, b: float | None) -> float | None:
        return round(b - a, 2) if a is not None and b is not None else None

    return {
        "timeline": events,
        "stages": stages,
        "gpu_nodes": [
            {k: n.get(k) for k in ("node_id", "node_type", "gpus", "added", "removed")} for n in gpu
        ],
        "head": next(
            (
                {"node_id": n["node_id"], "gpus": n["gpus"]}
                for n in sampler.nodes.values()
                if n["node_type"] == HEAD_TYPE
            ),
            None,
        ),
        "erase_rc": run["rc"],
        "erase_seconds": t_end,
        "gpu_first_asked_at": first_ask,
        "first_gpu_node_at": added[0] if added else None,
        "time_to_first_gpu_node_s": since(first_ask, added[0] if added else None),
        "workers_start_at": ws,
        "last_gpu_node_added_at": added[-1] if added else None,
        "time_to_last_gpu_node_after_workers_start_s": since(ws, added[-1] if added else None),
        "gpu_nodes_before_ask": [n["node_id"] for n in gpu if first_ask is None or n["added"] < first_ask],
        "last_stage_done_at": last_done,
        "all_gpu_nodes_removed": all_removed,
        "last_gpu_node_removed_at": last_removed,
        "scale_down_after_last_stage_s": since(last_done, last_removed),
        "scale_down_after_driver_exit_s": since(t_end, last_removed),
        "scale_down_bound_s": bound_s,
        "samples": len(sampler.samples),
        "sample_errors": sampler.errors,
    }


def concepts_per_node(root: Path) -> dict[str, int]:
    report = json.loads((Path(root) / "report.json").read_text())
    out: dict[str, int] = {}
    for c in report["concepts"]:
        node = c["where"].get("node", "?")
        out[node] = out.get(node, 0) + 1
    return out


def measure(
    work: Path, bound_s: float = 180.0, erase_timeout: float = 900.0, local: bool = True
) -> dict[str, Any]:
    """The local run (unless ``local`` is False), then the fake cluster's run with its
    timeline; the cluster is stopped whatever happens. Returns the figures, with the runs'
    folders (``ray_root``, ``local_root``) for the caller."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    concepts = work / "concepts.txt"
    concepts.write_text(CONCEPTS)
    local_s = local_run(concepts, work / "local", timeout=erase_timeout) if local else None
    cluster = FakeCluster()
    cfg = cluster.config
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    try:
        with cluster:
            run = ray_run(cluster, concepts, work / "ray", bound_s, erase_timeout)
            monitor = cluster.monitor_log()
    finally:
        for name in ("driver.log", "head.log"):
            if (cluster.dir / name).exists():
                shutil.copy(cluster.dir / name, logs / name)
        if (cluster.dir / "rt" / "session_latest" / "logs" / "monitor.log").exists():
            (logs / "monitor.log").write_text(cluster.monitor_log())
        cluster.cleanup()
    gpu_type = cfg["available_node_types"]["gpu"]
    res: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU (fake GPUs: workers on the CPU)",
        "ray": _ray_version(),
        "cluster": {
            "config": str(CONFIG.relative_to(ROOT)),
            "head": cfg["available_node_types"][HEAD_TYPE]["resources"],
            "gpu_node": gpu_type["resources"],
            "gpu_nodes_min": gpu_type["min_workers"],
            "gpu_nodes_max": gpu_type["max_workers"],
            "idle_timeout_s": 60 * cfg["idle_timeout_minutes"],
            "upscaling_speed": cfg["upscaling_speed"],
            "autoscaler_update_interval_s": 1,
        },
        "erase_flags": " ".join([*FLAGS, "--workers", str(WORKERS), "--gpus-per-worker", "1"]),
        "concepts": len(CONCEPTS.splitlines()),
        "sample_every_s": SAMPLE_EVERY_S,
    }
    res.update(analyse(run, monitor, bound_s))
    res["local_seconds"] = round(local_s, 1) if local_s is not None else None
    res["logs"] = str(logs)
    res["local_root"] = str(run_root(work / "local")) if local else None
    res["ray_root"] = None
    if run["rc"] != 0:
        res["driver_tail"] = run["driver"].tail()
        return res
    ray_root = run_root(work / "ray")
    res["ray_root"] = str(ray_root)
    res["concepts_per_node"] = concepts_per_node(ray_root)
    a = read_weights(ray_root)
    res["weights"] = {"ray_sha256": checksum(a)}
    if local:
        b = read_weights(run_root(work / "local"))
        res["weights"].update({"local_sha256": checksum(b), **compare(a, b)})
    return res


def _ray_version() -> str:
    import ray

    return ray.__version__


def summary(res: dict[str, Any]) -> str:
    lines = [f"{'t (s)':>8}  event"]
    for e in res["timeline"]:
        what = e.get("stage") or (f"{e.get('node_type', '')} {e['node_id'][-5:]}" if "node_id" in e else "")
        extra = f" ({e['seconds']:.1f}s)" if "seconds" in e else ""
        extra += f" x{e['count']}" if "count" in e else ""
        extra += f" by {e['by']}" if "by" in e else ""
        extra += f" ({e['why']})" if "why" in e else ""
        extra += f" rc={e['rc']}" if "rc" in e else ""
        t = f"{e['t']:8.1f}" if e["t"] is not None else "       ?"
        lines.append(" ".join(x for x in (f"{t} ", e["event"], what) if x) + extra)
    lines.append("")
    for name, s in res["stages"].items():
        nodes = ", ".join(i[-5:] for i in s.get("gpu_nodes_alive", [])) or "-"
        new = ", ".join(i[-5:] for i in s.get("gpu_nodes_added", []))
        lines.append(
            f"  {name:<16} {s.get('seconds', 0):6.1f}s  GPU nodes alive: {nodes}"
            + (f" (added: {new})" if new else "")
        )
    lines.append("")
    for k in (
        "gpu_first_asked_at", "first_gpu_node_at", "time_to_first_gpu_node_s", "workers_start_at",
        "last_gpu_node_added_at", "time_to_last_gpu_node_after_workers_start_s", "last_stage_done_at",
        "erase_seconds", "last_gpu_node_removed_at", "scale_down_after_last_stage_s",
        "scale_down_after_driver_exit_s", "concepts_per_node", "local_seconds",
    ):  # fmt: skip
        lines.append(f"  {k}: {res.get(k)}")
    if "weights" in res:
        w = res["weights"]
        lines.append(f"  weights ray   sha256 {w['ray_sha256']}")
        if "local_sha256" in w:
            lines.append(f"  weights local sha256 {w['local_sha256']}")
            lines.append(
                f"  allclose(atol={w['atol']}): {w['allclose']} (max abs diff {w['max_abs_diff']:.2e})"
            )
    return "\n".join(lines)


def to_json(res: dict[str, Any]) -> str:
    """Indented, with one line per timeline event and per node."""
    slots: dict[str, str] = {}
    out = dict(res)
    for key in ("timeline", "gpu_nodes"):
        items = []
        for i, item in enumerate(res.get(key) or []):
            slot = f"@@{key}{i}@@"
            slots[f'"{slot}"'] = json.dumps(item)
            items.append(slot)
        out[key] = items
    text = json.dumps(out, indent=1)
    for slot, item in slots.items():
        text = text.replace(slot, item)
    return text + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bound", type=float, default=180.0, help="seconds to wait for scale-down after the run")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--keep", action="store_true", help="keep the runs and logs (the folder is printed)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mace-autoscale-"))
    try:
        res = measure(work, bound_s=args.bound)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(summary(res))
    for k in ("local_root", "ray_root", "logs"):
        res.pop(k)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "autoscaling_fake_multinode.json"
    path.write_text(to_json(res))
    print(f"wrote {path}")
    if args.keep:
        print(f"runs and logs kept under {work}")
    if res["erase_rc"] != 0 or not res.get("weights", {}).get("allclose"):
        sys.exit(1)


if __name__ == "__main__":
    main()
