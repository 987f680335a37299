"""Command-line pieces shared by every ``mace-ray`` command (one definition each): the exit
codes, the one-line error (also for typer's own usage errors), plain help that fits the
terminal, ``--config`` YAML files, and the command group that imports eval and audit only
when they run."""

from __future__ import annotations

import importlib
import textwrap
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from typer.core import TyperCommand, TyperGroup

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


# ------------------------------------------------------------------ help

HELP_ALL = "help_all"  # the --help-all parameter
TERM_WIDTH = 26  # an option spelt longer than this has its help on the next line
TYPE_WORDS = {"str": "TEXT", "int": "INTEGER"}  # typer's <str>, <int range> as click spells them


def _metavar(ctx: Any, p: Any) -> str:
    """What an option's value looks like: ``TEXT``, ``INTEGER``, ``FILE``, ``INTEGER|auto``, or
    the choices ``[a|b|c]`` (typer writes ``<str>``, ``<int range>``, ``<a|b|c>``)."""
    shown = p.metavar or p.display_type(ctx)
    if not (shown.startswith("<") and shown.endswith(">")):
        return shown
    words = shown[1:-1].split("|")
    kind = words[0].split()[0].removeprefix("list[").rstrip("]")  # "int range", "list[int]"
    if len(words) > 1 and kind not in TYPE_WORDS and kind != "float":
        return f"[{'|'.join(words)}]"
    return "|".join([TYPE_WORDS.get(kind, kind.upper()), *words[1:]])


def _row(ctx: Any, p: Any) -> tuple[str, str]:
    term = p.opts[0] + ("" if p.is_flag else f" {_metavar(ctx, p)}")  # later names: old spellings
    default = getattr(p.default, "value", p.default)
    # NUL for the space inside "[default: X]": _write_rows keeps it on one line.
    shown = "" if p.is_flag or default is None or default in ("", [], ()) else f"  [default:\0{default}]"
    return term, (p.help or "") + shown + ("  [required]" if p.required else "")


def _write_rows(formatter: Any, rows: list[tuple[str, str]], col: int) -> None:
    """Two columns, the help wrapped at word boundaries only: a name, a choice or a default
    is never cut (click's writer breaks at hyphens, rich's table cuts long names)."""
    pad = " " * formatter.current_indent
    width = max(formatter.width - formatter.current_indent - col, 30)
    for term, text in rows:
        lines = textwrap.wrap(text, width, break_on_hyphens=False, break_long_words=False) or [""]
        lines = [line.replace("\0", " ") for line in lines]
        if len(term) + 2 > col:
            formatter.write(f"{pad}{term}\n")
            lines[0] = " " * col + lines[0]
        else:
            lines[0] = term.ljust(col) + lines[0]
        formatter.write(
            "".join(f"{pad}{line if i == 0 else ' ' * col + line}\n" for i, line in enumerate(lines))
        )


def _column(rows: list[tuple[str, str]]) -> int:
    """Where the help column starts: after the longest name up to TERM_WIDTH."""
    return min(max(len(term) for term, _ in rows), TERM_WIDTH) + 2


def _argument_name(p: Any) -> str:
    return str(p.metavar or p.name).upper()


class OneLineErrors(TyperCommand):
    """A mace-ray command: usage errors (a bad choice, a value out of range, an unknown
    option) as one ``fail`` line naming the option, like every other bad input (under
    ``ray job submit`` the job log ends with that line); and plain help grouped by panel
    that fits an 80-column terminal. Its hidden options (those a first run does without)
    are counted in ``--help`` and shown by ``--help-all``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rich_markup_mode = None  # plain text: nothing cut to fit a table, no escape codes

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except typer.TyperException as e:  # click's usage errors, as typer vendors click
            if getattr(e, "exit_code", None) != EXIT_BAD_INPUT:
                raise
            fail(e.format_message() if hasattr(e, "format_message") else str(e))

    def format_usage(self, ctx: Any, formatter: Any) -> None:
        args = [p for p in self.params if p.param_type_name == "argument"]
        names = [_argument_name(p) if p.required else f"[{_argument_name(p)}]" for p in args]
        formatter.write_usage(ctx.command_path, " ".join(["[OPTIONS]", *names]))

    def format_options(self, ctx: Any, formatter: Any) -> None:
        sections: dict[str, list[tuple[str, str]]] = {}
        left_out = 0
        for p in self.get_params(ctx):
            if p.hidden:
                left_out += 1
            elif p.param_type_name == "argument":
                sections.setdefault("Arguments", []).append((_argument_name(p), p.help or ""))
            else:
                sections.setdefault(p.rich_help_panel or "Options", []).append(_row(ctx, p))
        order = ["Arguments", *Panel.order(), "Options"]
        col = _column([row for rows in sections.values() for row in rows])
        for title in sorted(sections, key=lambda t: order.index(t) if t in order else len(order)):
            with formatter.section(title):
                _write_rows(formatter, sections[title], col)
        if left_out:
            formatter.write_paragraph()
            formatter.write_text(f"{left_out} more options: --help-all shows every option.")


def _help_all(ctx: typer.Context, param: Any, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        for p in ctx.command.params:
            p.hidden = False
        typer.echo(ctx.get_help())
        raise typer.Exit()


HelpAllOpt = Annotated[
    bool, typer.Option("--help-all", is_eager=True, callback=_help_all, help="Show every option and exit.")
]

# Commands whose options come from settings that import torch (mace_core.evaluation,
# mace_core.audit): imported when named, so that `mace-ray --help`, `--version` and the other
# commands' help start in a fraction of a second. name -> (module with a one-command `app`, summary)
LAZY_COMMANDS = {
    "eval": ("mace_ray.cli.eval", "Evaluate MODEL with one of the paper's protocols (MACE Sec. 4)."),
    "audit": ("mace_ray.cli.audit", "Attack the concepts erased from MODEL and measure what comes back."),
}


class LazyCommands(TyperGroup):
    """The ``mace-ray`` group: its own commands, then those of LAZY_COMMANDS, loaded on use."""

    def list_commands(self, ctx: Any) -> list[str]:
        return [*self.commands, *(name for name in LAZY_COMMANDS if name not in self.commands)]

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        if cmd_name in LAZY_COMMANDS and cmd_name not in self.commands:
            module = importlib.import_module(LAZY_COMMANDS[cmd_name][0])
            self.commands[cmd_name] = typer.main.get_command(module.app)
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx: Any, formatter: Any) -> None:
        rows = [
            (
                name,
                LAZY_COMMANDS[name][1]
                if name not in self.commands
                else self.commands[name].get_short_help_str(120),
            )
            for name in self.list_commands(ctx)
        ]
        with formatter.section("Commands"):
            _write_rows(formatter, rows, _column(rows))


# ------------------------------------------------------------------ --config

# Keys that named a switch the other way round: a True-default bool is now the flag that
# turns it off (`resume: false` is `no_resume: true`). Any other `x` has its `no_x` found.
RENAMED_KEYS = {"verbose": "quiet"}


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
    # Keys are option names, dashes or underscores (`type` is the parameter `type_`).
    params = {
        (p.opts[0].removeprefix("--") if p.param_type_name == "option" else p.name).replace("-", "_"): p
        for p in ctx.command.params
        if p.name not in ("config", HELP_ALL)
    }
    defaults: dict[str, Any] = {}
    for key, v in data.items():
        name = str(key).replace("-", "_")
        if name not in params:
            new = RENAMED_KEYS.get(name, f"no_{name}")
            if new in params:
                fail(f"config {str(value)!r}: key {key!r} is now {new!r} ({key}: false is {new}: true)")
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


ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        is_eager=True,
        callback=load_config,
        rich_help_panel=Panel.RUN,
        help="YAML file of option values (keys as option names); command-line options override it.",
    ),
]
