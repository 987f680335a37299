"""Resources a stage declares, as data; one adapter turns them into Ray options."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mace_core.errors import SettingError


@dataclass(frozen=True)
class Resources:
    cpus: float = 1.0
    gpus: float = 0.0
    memory_gb: float | None = None

    def __post_init__(self) -> None:
        if self.cpus < 0 or self.gpus < 0:
            raise SettingError(f"resources must be >= 0, got cpus={self.cpus} gpus={self.gpus}")
        if self.gpus > 1 and self.gpus != int(self.gpus):
            raise SettingError(f"more than one GPU must be a whole number, got {self.gpus}")

    def __str__(self) -> str:
        """For log lines: '1 CPU, 1 GPU' (and memory when set)."""

        def num(x: float) -> str:
            return f"{x:g}"

        out = f"{num(self.cpus)} CPU, {num(self.gpus)} GPU"
        return out + (f", {num(self.memory_gb)} GB memory" if self.memory_gb else "")

    def to_ray_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"num_cpus": self.cpus, "num_gpus": self.gpus}
        if self.memory_gb:
            opts["memory"] = int(self.memory_gb * 2**30)
        return opts

    def bundle(self) -> dict[str, float]:
        """One worker in Ray's resource names (memory in bytes), for ``request_resources`` and
        the placement check; amounts of 0 are left out (they always fit)."""
        b = {"CPU": float(self.cpus), "GPU": float(self.gpus)}
        if self.memory_gb:
            b["memory"] = float(self.memory_gb * 2**30)
        return {k: v for k, v in b.items() if v}
