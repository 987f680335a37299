"""Where calls run: in this process (LocalBackend) or on a Ray cluster (RayBackend).

The driver talks to workers only through ``spawn`` / ``call`` / ``wait`` / ``get``, so
one driver loop serves both; Ray is imported inside RayBackend only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from mace_core.errors import MaceError
from mace_ray.resources import Resources

log = logging.getLogger("mace_ray")


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

    def wait(self, refs: list[LocalRef]) -> tuple[list[LocalRef], list[LocalRef]]:
        return list(refs), []

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

    def wait(self, refs: list[Any]) -> tuple[list[Any], list[Any]]:
        return self.ray.wait(refs, num_returns=1)

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
