"""The placement check that runs before a run writes anything: at least one worker of the
requested shape fits on a node of the cluster (or of this machine, for the local executor);
otherwise, when an autoscaler may add nodes, ask it and wait a bounded time. Without this,
Ray keeps the actors pending forever. Fails with one line (``PlacementError``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Mapping
from typing import Any

from mace_core.errors import MaceError
from mace_ray.engine.resources import Resources

log = logging.getLogger("mace_ray")


class PlacementError(MaceError):
    """No node can hold one worker of the requested shape, and none is being added."""


def fits_on(node: Mapping[str, float], need: Mapping[str, float], cap: int) -> int:
    """How many workers needing ``need`` a node with ``node`` total resources holds (<= cap)."""
    return min([cap, *(math.floor(node.get(k, 0.0) / v + 1e-9) for k, v in need.items())])


def capacity(nodes: Iterable[Mapping[str, float]], need: Mapping[str, float], cap: int) -> int:
    """Workers the nodes hold at once (each worker on one node), at most ``cap``."""
    return min(cap, sum(fits_on(n, need, cap) for n in nodes))


def describe(amounts: Mapping[str, float]) -> str:
    """'1 CPU, 1 GPU, 8.0 GB memory': resources for a message."""
    parts = []
    for key, unit in (("CPU", "CPU"), ("GPU", "GPU"), ("memory", "GB memory")):
        if key in amounts:
            value = amounts[key] / 2**30 if key == "memory" else amounts[key]
            parts.append(f"{_num(value)} {unit}")
    return ", ".join(parts) or "no resources"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.1f}"


def _shortfall(nodes: list[Mapping[str, float]], need: Mapping[str, float], where: str) -> str:
    """Why no node fits: the resource that no node has enough of, or 'not together'."""
    short = [k for k, v in need.items() if max((n.get(k, 0.0) for n in nodes), default=0.0) + 1e-9 < v]
    if not short:
        return f"no node of {where} has all of it together"
    key = short[0]
    most = max((n.get(key, 0.0) for n in nodes), default=0.0)
    total = sum(n.get(key, 0.0) for n in nodes)
    name = {"CPU": "CPUs", "GPU": "GPUs", "memory": "GB of memory"}[key]
    if key == "memory":
        most, total = most / 2**30, total / 2**30
    if len(nodes) <= 1 or most == total:
        return f"{where} has {_num(total)} {name}"
    return f"{where} has {_num(total)} {name}, at most {_num(most)} on one node"


def _totals(nodes: list[Mapping[str, float]]) -> dict[str, float]:
    return {k: sum(n.get(k, 0.0) for n in nodes) for k in ("CPU", "GPU", "memory")}


def check_placeable(
    backend: Any,
    resources: Resources,
    count: int,
    wait_s: float = 300.0,
    *,
    what: str | None = None,
    poll_s: float = 2.0,
) -> int:
    """Fail at once, in one line, if no worker of this shape can ever start; else how many fit.

    ``backend`` is a LocalBackend or RayBackend (``node_resources``, ``autoscaler``,
    ``request_resources``). A worker must fit on one node. When none fits and the cluster
    has an autoscaler, the ``count`` workers are requested from it and the nodes polled
    every ``poll_s`` up to ``wait_s`` seconds; without one there is nothing to wait for.
    ``what`` names the setting at fault in the message (e.g. "--gpus-per-worker 1").
    Returns the number of workers (1..count) the cluster holds at once now.
    """
    count = max(1, count)
    need = resources.bundle()
    nodes = backend.node_resources()
    fit = capacity(nodes, need, count)
    if fit:
        return fit
    local = backend.name == "local"
    where = "this machine" if local else "the Ray cluster"
    label = f"{what}: " if what else ""
    head = f"{label}a worker needs {describe(need)} but {_shortfall(nodes, need, where)}"
    have = f"({where}: {describe(_totals(nodes))})"
    if local:
        raise PlacementError(f"{head} {have}; the local executor runs on this machine only")
    scaler = backend.autoscaler()
    if scaler is None:
        raise PlacementError(f"{head} {have}, and no autoscaler can add a node")
    log.info("%s; asking %s for %d worker(s), waiting up to %.0fs", head, scaler, count, wait_s)
    return _wait_for_nodes(backend, need, count, wait_s, poll_s, head)


def _wait_for_nodes(
    backend: Any, need: dict[str, float], count: int, wait_s: float, poll_s: float, head: str
) -> int:
    """Ask the autoscaler for ``count`` workers and poll until one fits or time is up."""
    backend.request_resources([dict(need)] * count)
    deadline = time.monotonic() + wait_s
    while True:
        nodes = backend.node_resources()
        fit = capacity(nodes, need, count)
        if fit:
            return fit  # the request stays: the driver replaces it with its own
        left = deadline - time.monotonic()
        if left <= 0:
            break
        time.sleep(min(poll_s, left))
    backend.request_resources([])  # the run will not start: do not grow the cluster for it
    raise PlacementError(
        f"{head} and the autoscaler added no such node within {wait_s:.0f}s "
        f"(the Ray cluster now: {describe(_totals(nodes))})"
    )
