"""Command-line pieces shared by several ``mace-ray`` commands (one definition each):
options, the exit codes, the one-line error, and ``--config`` YAML files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import click
import typer

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2

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


def fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    """One line on stderr and exit ``code`` (2: bad input)."""
    # One line: under `ray job submit` this is the line the job log ends with.
    typer.echo(f"mace-ray: error: {' '.join(message.split())}", err=True)
    raise typer.Exit(code)


# Config keys that differ from the function parameter names.
_CONFIG_ALIASES = {"type": "type_"}


def load_config(ctx: typer.Context, param: click.Parameter, value: Path | None) -> Path | None:
    """``--config job.yaml``: option values from a YAML mapping; the command line wins."""
    if value is None:
        return None
    import yaml

    try:
        data = yaml.safe_load(value.read_text(encoding="utf-8"))
    except FileNotFoundError:
        fail(f"config {str(value)!r} does not exist")
    except (OSError, yaml.YAMLError) as e:
        fail(f"config {str(value)!r} cannot be read: {e}")
    if not isinstance(data, dict):
        fail(f"config {str(value)!r} must be a mapping of option names to values")
    params = {p.name: p for p in ctx.command.params if p.name != "config"}
    defaults: dict[str, Any] = {}
    for key, v in data.items():
        name = _CONFIG_ALIASES.get(str(key), str(key).replace("-", "_"))
        if name not in params:
            valid = ", ".join(sorted(str(n).rstrip("_") for n in params))
            fail(f"config {str(value)!r}: unknown option {key!r} (valid: {valid})")
        # Checked here, so that a bad value is named with its file and key in one line
        # (click would report it later as a usage box about the option, not the file).
        try:
            if v is not None and params[name].callback is None:  # converts and range-checks only
                params[name].process_value(ctx, v)
        except Exception as e:  # typer's BadParameter (its own click), or a type's own error
            message = e.format_message() if hasattr(e, "format_message") else str(e)
            fail(f"config {str(value)!r}: {key}: {message}")
        defaults[name] = v
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        is_eager=True,
        callback=load_config,
        help="YAML file of option values (keys as option names); command-line options override it.",
    ),
]
