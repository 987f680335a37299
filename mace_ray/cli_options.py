"""Command-line options shared by several ``mace-ray`` commands (one definition each)."""

from __future__ import annotations

from typing import Annotated

import typer

ExecutorOpt = Annotated[str, typer.Option(help="ray (a cluster, or a local Ray) or local (this process).")]
AddressOpt = Annotated[
    str | None, typer.Option(help="Ray cluster address (default: RAY_ADDRESS, else start a local Ray).")
]
GpusPerWorkerOpt = Annotated[
    float | None,
    typer.Option(min=0.0, help="GPUs per worker, fractions allowed (default: 1 if any GPU)."),
]
S3EndpointOpt = Annotated[
    str | None, typer.Option(help="S3 endpoint URL (default: AWS_ENDPOINT_URL, else AWS).")
]
