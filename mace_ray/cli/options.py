"""Command-line pieces shared by every ``mace-ray`` command (one definition each): the exit
codes, the one-line error (also for typer's own usage errors), and ``--config`` YAML files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import click
import typer
from typer.core import TyperCommand

from mace_core.options import Panel

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2


class Failed(typer.Exit):
    """``fail``'s exit. ``str()`` is the message, for callers that parse a command line
    without running it (``make_context``) and see the exception, not the output."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(code)
        self.message = message

    def __str__(self) -> str:
        return self.message


def fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    """One line on stderr and exit ``code`` (2: bad input)."""
    # One line: under `ray job submit` this is the line the job log ends with.
    line = " ".join(message.split())
    typer.echo(f"mace-ray: error: {line}", err=True)
    raise Failed(line, code)


class OneLineErrors(TyperCommand):
    """A command whose usage errors (a bad choice, a value out of range, an unknown option)
    are one ``fail`` line naming the option, like every other bad input, instead of typer's
    box: under ``ray job submit`` the job log ends with that line."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except typer.TyperException as e:  # click's usage errors, as typer vendors click
            if getattr(e, "exit_code", None) != EXIT_BAD_INPUT:
                raise
            fail(e.format_message() if hasattr(e, "format_message") else str(e))


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
    # Keys are option names (dashes or underscores): `type` is the parameter `type_`.
    params = {_config_key(p): p for p in ctx.command.params if p.name != "config"}
    defaults: dict[str, Any] = {}
    for key, v in data.items():
        name = str(key).replace("-", "_")
        if name not in params:
            valid = ", ".join(sorted(params))
            fail(f"config {str(value)!r}: unknown option {key!r} (valid: {valid})")
        # Checked here, so that a bad value is named with its file and key in one line
        # (click would report it later naming the option, not the file).
        try:
            if v is not None and params[name].callback is None:  # converts and range-checks only
                params[name].process_value(ctx, v)
        except Exception as e:  # typer's BadParameter (its own click), or a type's own error
            message = e.format_message() if hasattr(e, "format_message") else str(e)
            fail(f"config {str(value)!r}: {key}: {message}")
        defaults[params[name].name] = v
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


def _config_key(param: Any) -> str:
    """An argument's name, or an option's long name with underscores (``--type`` -> type)."""
    if param.param_type_name == "argument":
        return str(param.name)
    return next(o for o in param.opts if o.startswith("--"))[2:].replace("-", "_")


ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        is_eager=True,
        callback=load_config,
        rich_help_panel=Panel.RUN,
        help="YAML file of option values (keys as option names); command-line options override it.",
    ),
]
