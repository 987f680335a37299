"""Where and how a job runs: ``WhereItRuns``, the options every request shares (executor,
cluster address, workers, GPUs per worker, device, S3 endpoint, progress), declared once;
``output_setting`` and ``resume_setting``: --output and --no-resume, which every request
declares in its own place and words.

Every field carries its command-line metadata (mace_core/options.py); mace_ray/cli/build.py
builds the commands from the request classes that extend it (erase/request.py,
eval/request.py, audit/request.py). Kept free of the job modules (diffusers, Ray) so that
``mace-ray --help`` stays quick.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mace_core.options import Choice, Panel, Settings, option, setting


class Executor(Choice):
    RAY = "ray"  # a Ray cluster, or a local Ray
    LOCAL = "local"  # everything in this process


# Options of both commands: one text each.
EXECUTOR = option("ray (a cluster, or a local Ray) or local (this process).", panel=Panel.CLUSTER, basic=True)
ADDRESS = option(
    "Ray cluster address (default: RAY_ADDRESS, else start a local Ray).", panel=Panel.CLUSTER, basic=True
)
GPUS_PER_WORKER = option(
    "GPUs per worker, fractions allowed (default: 1 if the cluster has GPUs).", min=0.0, panel=Panel.CLUSTER
)
DEVICE = option("torch device (default: cuda if present, else cpu).", panel=Panel.CLUSTER)
S3_ENDPOINT = option("S3 endpoint URL (default: AWS_ENDPOINT_URL, else AWS).", panel=Panel.CLUSTER)
QUIET = option(
    "No progress lines: only warnings, errors and the result.", name="quiet", panel=Panel.RUN, basic=True
)

FILE, FOLDER = "<file>", "<folder>"

# --output's default: the root every command writes its jobs under and finds runs in.
DEFAULT_OUTPUT = "mace-runs"


def output_setting(where: str) -> Any:
    """The ``--output`` of a job; ``where`` says what it writes there ("Where evals/ is written")."""
    return setting(DEFAULT_OUTPUT, f"{where}: a folder or s3://bucket/prefix.", panel=Panel.MODEL, basic=True)


def path_setting(help: str, panel: str, *, metavar: str = FILE, **kw: Any) -> Any:
    """An optional input the job reads, a local path or an s3:// URL (None: the default its
    help names): ``--name <file>`` or ``<folder>``."""
    return setting(None, help, panel=panel, metavar=metavar, **kw)


def resume_setting(help: str) -> Any:
    """``--no-resume``: by default a job reuses what an earlier one with the same inputs stored;
    ``help`` says what the flag makes again instead."""
    return setting(True, help, name="no-resume", panel=Panel.RUN)


@dataclass(frozen=True, kw_only=True)
class WhereItRuns(Settings):
    """Where and how a job runs: the options erase, eval and audit share, declared once.

    Keyword-only, so that each request's own fields keep their positions.
    """

    executor: Executor = field(default=Executor.RAY, metadata=EXECUTOR)
    # Ray cluster; None: RAY_ADDRESS, else a local Ray
    address: str | None = field(default=None, metadata=ADDRESS)
    # None: one per GPU (gpus_per_worker each), else 1
    workers: int | None = setting(
        None, "Workers (default: one per GPU of the cluster, else 1).", min=1, panel=Panel.CLUSTER, basic=True
    )
    # None: 1 if the cluster has GPUs, else 0
    gpus_per_worker: float | None = field(default=None, metadata=GPUS_PER_WORKER)
    device: str | None = field(default=None, metadata=DEVICE)
    s3_endpoint: str | None = field(default=None, metadata=S3_ENDPOINT)
    # Progress bars and lines inside the stages (the CLI's --quiet: off).
    progress: bool = field(default=True, metadata=QUIET)

    def for_workers(self) -> dict[str, Any]:
        """What every worker's spec copies from the request: the S3 endpoint of its output,
        its torch device, whether it draws progress."""
        return {"s3_endpoint": self.s3_endpoint, "device": self.device, "progress": self.progress}
