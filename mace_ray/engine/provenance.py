"""Where work ran and with what: package versions for manifests and reports, worker
placement for the report's per-worker lines."""

from __future__ import annotations

import platform
import socket


def versions() -> dict[str, str]:
    """Versions of what can change a result, for manifests and reports."""
    import diffusers
    import torch
    import transformers

    import mace_core

    out = {
        "mace-ray": mace_core.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }
    try:
        import ray

        out["ray"] = ray.__version__
    except ImportError:
        pass
    return out


def where_am_i(name: str) -> dict[str, str]:
    """Worker name, host and (under Ray) node id: reports show where work ran."""
    out = {"worker": name, "host": socket.gethostname()}
    try:
        import ray

        if ray.is_initialized():
            out["node"] = ray.get_runtime_context().get_node_id()
    except ImportError:
        pass
    return out
