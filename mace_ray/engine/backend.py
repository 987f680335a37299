"""Where calls run: in this process (LocalBackend) or on a Ray cluster (RayBackend).

The driver talks to workers only through the ``Backend`` protocol (``spawn`` / ``call`` /
``wait`` / ``get`` ...), so one driver loop serves both; Ray is imported inside
RayBackend and ``backend_for`` only.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from mace_core.errors import MaceError
from mace_ray.engine.resources import Resources

log = logging.getLogger("mace_ray")


class Backend(Protocol):
    """What the runtime needs of an executor."""

    name: str  # "local" or "ray"

    def spawn(
        self, cls: type, args: tuple, resources: Resources, name: str, restartable: bool = False
    ) -> Any: ...
    def call(self, handle: Any, method: str, *args: Any, task_name: str | None = None) -> Any: ...
    def wait(self, refs: list[Any], timeout: float | None = None) -> tuple[list[Any], list[Any]]: ...
    def get(self, ref: Any) -> Any: ...
    def put(self, value: Any) -> Any: ...
    def is_infrastructure_error(self, exc: BaseException) -> bool: ...
    def kill(self, handle: Any) -> None: ...
    def request_resources(self, bundles: list[dict[str, float]]) -> None: ...
    def gpus_available(self) -> float: ...
    def cpus_available(self) -> float: ...
    def node_resources(self) -> list[dict[str, float]]: ...
    def autoscaler(self) -> str | None: ...


@contextmanager
def backend_for(executor: str, address: str | None = None) -> Iterator[Backend]:
    """The executor's backend ("local" or "ray", mace_ray.engine.requests.Executor); a local
    Ray is started (and stopped) when no cluster is named."""
    if executor == "local":
        yield LocalBackend()
        return
    import ray

    started = False
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            # address="local" ignores stale cluster files of earlier `ray start`s.
            ray.init(address="local", log_to_driver=True)
        started = True
    try:
        yield RayBackend()
    finally:
        if started:
            ray.shutdown()


@dataclass(eq=False)  # hashed by identity, like Ray object refs
class LocalRef:
    """A finished local call: its value or its exception."""

    value: Any = None
    error: BaseException | None = None


class LocalBackend:
    """Runs every call at once in this process; nothing can die separately."""

    name = "local"

    def spawn(
        self, cls: type, args: tuple, resources: Resources, name: str, restartable: bool = False
    ) -> Any:
        return cls(*args)

    def call(self, handle: Any, method: str, *args: Any, task_name: str | None = None) -> LocalRef:
        try:
            return LocalRef(value=getattr(handle, method)(*args))
        except MaceError as e:
            return LocalRef(error=e)

    def wait(
        self, refs: list[LocalRef], timeout: float | None = None
    ) -> tuple[list[LocalRef], list[LocalRef]]:
        return list(refs), []  # calls ran when they were made

    def get(self, ref: LocalRef) -> Any:
        if ref.error is not None:
            raise ref.error
        return ref.value

    def put(self, value: Any) -> Any:
        return value

    def is_infrastructure_error(self, exc: BaseException) -> bool:
        return False

    def kill(self, handle: Any) -> None:
        teardown = getattr(handle, "teardown", None)
        if teardown is not None:
            teardown()

    def request_resources(self, bundles: list[dict[str, float]]) -> None:
        pass

    def gpus_available(self) -> float:
        import torch

        return float(torch.cuda.device_count())

    def cpus_available(self) -> float:
        return local_machine_resources()["CPU"]

    def node_resources(self) -> list[dict[str, float]]:
        """This machine as the one node of the local executor, in Ray's resource names."""
        return [local_machine_resources()]

    def autoscaler(self) -> str | None:
        """Nothing adds machines to this process."""
        return None


def local_machine_resources() -> dict[str, float]:
    """CPUs this process may use, CUDA devices and physical memory (bytes) of this machine."""
    import torch

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    memory = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    return {"CPU": float(cpus), "GPU": float(torch.cuda.device_count()), "memory": memory}


# The read-only autoscaler that every Ray head runs when no autoscaling config was given
# (`ray start --head`, a local ray.init, KubeRay without autoscaling) names each node's
# type after the node: "node_<node id hex>" (ray.autoscaler._private.util.
# format_readonly_node_type). A cluster launcher, KubeRay or Ray-on-Spark autoscaler uses
# the node types of its config instead ("ray.head.default", "gpu-group"...).
_READONLY_NODE_TYPE = re.compile(r"^node_[0-9a-f]{32,}$")


def launcher_node_types(names: Iterable[str]) -> list[str]:
    """The node type names that come from an autoscaling config (not read-only ones)."""
    return sorted({n for n in names if n and not _READONLY_NODE_TYPE.match(n)})


def autoscaler_from_v1_status(raw: bytes | str | None) -> str | None:
    """The v1 monitor's status report (internal KV "__autoscaling_status", what `ray status`
    prints) -> a description of an autoscaler that can add nodes, or None."""
    if not raw:
        return None  # no monitor at all (`ray start --no-monitor`), or it has not reported yet
    report = json.loads(raw).get("autoscaler_report") or {}
    if report.get("pending_launches") or report.get("pending_nodes"):
        return "the Ray autoscaler (launching nodes now)"
    names = [*(report.get("active_nodes") or {}), *(report.get("node_type_mapping") or {}).values()]
    managed = launcher_node_types(names)
    return f"the Ray autoscaler (node types: {', '.join(managed)})" if managed else None


def autoscaler_from_v2_status(status: Any) -> str | None:
    """The same decision from autoscaler v2's ``get_cluster_status`` (a ClusterStatus)."""
    if status.pending_launches or status.pending_nodes:
        return "the Ray autoscaler v2 (launching nodes now)"
    nodes = [*status.active_nodes, *status.idle_nodes]
    managed = launcher_node_types(n.ray_node_type_name for n in nodes)
    return f"the Ray autoscaler v2 (node types: {', '.join(managed)})" if managed else None


# Restarts of a restartable actor (and retries of each call on it) before the run fails.
STATS_MAX_RESTARTS = 3


class RayBackend:
    """Long-lived actors on a Ray cluster; infrastructure failures are reported as such."""

    name = "ray"

    def __init__(self) -> None:
        import ray

        self.ray = ray

    def spawn(
        self, cls: type, args: tuple, resources: Resources, name: str, restartable: bool = False
    ) -> Any:
        opts = resources.to_ray_options()
        if restartable:
            # Only for actors whose every method is idempotent and whose state rebuilds
            # from storage (the statistics actor): Ray restarts them and retries calls, a
            # bounded number of times, so that a crash that recurs ends the run (resumable)
            # instead of looping.
            opts.update(max_restarts=STATS_MAX_RESTARTS, max_task_retries=STATS_MAX_RESTARTS)
        return self.ray.remote(cls).options(name=name, **opts).remote(*args)

    def call(self, handle: Any, method: str, *args: Any, task_name: str | None = None) -> Any:
        m = getattr(handle, method)
        if task_name:
            m = m.options(name=task_name)
        return m.remote(*args)

    def wait(self, refs: list[Any], timeout: float | None = None) -> tuple[list[Any], list[Any]]:
        """At least one ready ref, or none after ``timeout`` seconds (None: no limit)."""
        return self.ray.wait(refs, num_returns=1, timeout=timeout)

    def get(self, ref: Any) -> Any:
        from ray.exceptions import RayTaskError

        try:
            return self.ray.get(ref)
        except RayTaskError as e:
            # Application errors surface as the user's exception with its own message.
            if isinstance(e.cause, MaceError):
                raise e.cause from None
            raise

    def put(self, value: Any) -> Any:
        return self.ray.put(value)

    def is_infrastructure_error(self, exc: BaseException) -> bool:
        from ray import exceptions as rex

        if isinstance(exc, rex.RayActorError) and exc.actor_init_failed:
            return False  # a bug in a worker's constructor, not a lost machine
        infra = (
            rex.RayActorError,
            rex.WorkerCrashedError,
            rex.NodeDiedError,
            rex.ObjectLostError,
            rex.OwnerDiedError,
        )
        return isinstance(exc, infra)

    def kill(self, handle: Any) -> None:
        try:
            self.ray.kill(handle)
        except Exception as e:  # already dead: nothing to release
            log.debug("kill: %s", e)

    def request_resources(self, bundles: list[dict[str, float]]) -> None:
        """Tell the autoscaler what the GPU stages can use now (empty list: nothing)."""
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=bundles)

    def gpus_available(self) -> float:
        return float(self.ray.cluster_resources().get("GPU", 0.0))

    def cpus_available(self) -> float:
        return float(self.ray.cluster_resources().get("CPU", 0.0))

    def node_resources(self) -> list[dict[str, float]]:
        """Total resources of each alive node (a worker must fit on one node)."""
        return [dict(n.get("Resources") or {}) for n in self.ray.nodes() if n.get("Alive")]

    def autoscaler(self) -> str | None:
        """A description of what may add nodes to this cluster, or None when nothing can.

        Every head runs a monitor; without an autoscaling config it is read-only and its
        node types are the nodes themselves (see ``launcher_node_types``). Autoscaler v2
        (enabled in the cluster's GCS) is read through ``get_cluster_status``, v1 through
        the status report its monitor leaves in the internal KV. When neither can be read
        (Ray's internal API changed, Ray Client), assume an autoscaler: waiting for nodes
        that never come fails later, refusing a cluster that would have grown fails wrongly.
        """
        try:
            from ray.autoscaler.v2.utils import is_autoscaler_v2

            if is_autoscaler_v2(fetch_from_server=True):
                from ray.autoscaler.v2.sdk import get_cluster_status

                status = get_cluster_status(self.ray.get_runtime_context().gcs_address)
                return autoscaler_from_v2_status(status)
            from ray.experimental.internal_kv import _internal_kv_get

            return autoscaler_from_v1_status(_internal_kv_get("__autoscaling_status"))
        except Exception as e:  # private Ray API: never let the check itself fail a run
            log.warning("cannot tell whether the Ray cluster autoscales (%s); assuming it may", e)
            return "an autoscaler (not verified)"
