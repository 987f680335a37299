"""What every ``mace-ray`` command shares: exit codes, the one-line error (typer's usage errors
too), plain help that fits the terminal, ``--config`` files, and the group that imports eval and
audit only when they run."""

from __future__ import annotations

import importlib
import textwrap
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperCommand, TyperGroup

from mace_core.options import Panel

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2
# Stopped by Ctrl-C (SIGINT, 128 + 2, as a shell reports it): one line, and the job resumes.
EXIT_SIGINT = 130


class Failed(typer.Exit):
    """``fail``'s exit; ``str()`` is the message, for callers that only parse (``make_context``)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(code)
        self.args = (message,)


def fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    """One line on stderr (the line a `ray job submit` log ends with) and exit ``code``."""
    line = " ".join(message.split())
    typer.echo(f"mace-ray: error: {line}", err=True)
    raise Failed(line, code)


HELP_ALL = "help_all"  # the --help-all parameter
TERM_WIDTH = 26  # an option spelt longer than this has its help on the next line
TYPE_WORDS = {"str": "TEXT", "int": "INTEGER"}  # typer's <str>, <int range> as click spells them


def type_word(name: str) -> str:
    return TYPE_WORDS.get(name, name.upper())


def _metavar(ctx: Any, p: Any) -> str:
    """What an option's value looks like: ``TEXT``, ``INTEGER``, ``PATH``, ``INTEGER|auto``, or
    the choices ``[a|b|c]`` (typer writes ``<str>``, ``<int range>``, ``<list[int]>``, ``<a|b|c>``)."""
    shown = p.metavar or p.display_type(ctx)
    if not shown.startswith("<"):
        return shown
    inner = shown[1:-1]
    return f"[{inner}]" if "|" in inner else type_word(inner.split()[0].removeprefix("list[").rstrip("]"))


def _row(ctx: Any, p: Any) -> tuple[str, str]:
    if p.param_type_name == "argument":
        return str(p.metavar or p.name).upper(), p.help or ""
    term = p.opts[0] + ("" if p.is_flag else f" {_metavar(ctx, p)}")  # later names: old spellings
    default = getattr(p.default, "value", p.default)
    shown = "" if p.is_flag or default in (None, "", [], ()) else f"  [default:\0{default}]"
    return term, (p.help or "") + shown + ("  [required]" if p.required else "")


def _write_sections(formatter: Any, sections: dict[str, list[tuple[str, str]]]) -> None:
    """Two columns, one first column for all sections (names up to TERM_WIDTH wide), the help
    wrapped at spaces only: a name, a choice or a default is never cut (click's writer breaks at
    hyphens and long words, rich's table cuts long names). "\\0" is the space of "[default: X]"."""
    col = min(max(len(term) for rows in sections.values() for term, _ in rows), TERM_WIDTH) + 2
    pad, width = "  ", max(formatter.width - 2 - col, 30)  # inside a section: indented by 2
    for title, rows in sections.items():
        with formatter.section(title):
            for term, text in rows:
                lines = textwrap.wrap(text, width, break_on_hyphens=False, break_long_words=False) or [""]
                first = term.ljust(col) if len(term) + 2 <= col else f"{term}\n{pad}{' ' * col}"
                lines = [first + lines[0], *(" " * col + line for line in lines[1:])]
                formatter.write("".join(f"{pad}{line}\n".replace("\0", " ") for line in lines))


class OneLineErrors(TyperCommand):
    """A mace-ray command: usage errors (a bad choice, a value out of range, an unknown option)
    as one ``fail`` line naming the option; plain help (``rich_markup_mode=None``) by panel that
    fits 80 columns, its hidden options (what a first run does without) only in ``--help-all``."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except typer.TyperException as e:  # click's usage errors, as typer vendors click
            if getattr(e, "exit_code", None) != EXIT_BAD_INPUT:
                raise
            fail(e.format_message() if hasattr(e, "format_message") else str(e))

    def format_usage(self, ctx: Any, formatter: Any) -> None:
        args = [(p.required, _row(ctx, p)[0]) for p in self.params if p.param_type_name == "argument"]
        names = [name if required else f"[{name}]" for required, name in args]
        formatter.write_usage(ctx.command_path, " ".join(["[OPTIONS]", *names]))

    def format_options(self, ctx: Any, formatter: Any) -> None:
        sections: dict[str, list[tuple[str, str]]] = {}
        for p in (p for p in self.get_params(ctx) if not p.hidden):
            title = "Arguments" if p.param_type_name == "argument" else p.rich_help_panel or "Options"
            sections.setdefault(title, []).append(_row(ctx, p))
        order = ["Arguments", *(v for k, v in vars(Panel).items() if k.isupper()), "Options"]
        titles = sorted(sections, key=lambda t: order.index(t) if t in order else len(order))
        _write_sections(formatter, {t: sections[t] for t in titles})
        left_out = sum(p.hidden for p in self.get_params(ctx))
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

# Commands whose settings import torch: imported when named, so that `mace-ray --help`, `--version`
# and the other commands start in a fraction of a second. name -> (module with an `app`, summary)
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
            (n, self.commands[n].get_short_help_str(120) if n in self.commands else LAZY_COMMANDS[n][1])
            for n in self.list_commands(ctx)
        ]
        _write_sections(formatter, {"Commands": rows})


# Keys that named a switch the other way round: a True-default bool is now the flag that
# turns it off (`resume: false` is `no_resume: true`). Any other `x` has its `no_x` found.
RENAMED_KEYS = {"verbose": "quiet"}


def load_config(ctx: typer.Context, param: Any, value: Path | None) -> Path | None:
    """``--config job.yaml``: option values from a YAML mapping; the command line wins."""
    if value is None:
        return None
    import yaml

    where = f"config {str(value)!r}"
    try:
        data = yaml.safe_load(value.read_text(encoding="utf-8"))
    except FileNotFoundError:
        fail(f"{where} does not exist")
    except (OSError, yaml.YAMLError) as e:
        fail(f"{where} cannot be read: {e}")
    if not isinstance(data, dict):
        fail(f"{where} must be a mapping of option names to values")
    # Keys are option names (an argument's is its name), dashes or underscores.
    params = {p.opts[0].removeprefix("--").replace("-", "_"): p for p in ctx.command.params}
    params = {k: p for k, p in params.items() if p.name not in ("config", HELP_ALL)}
    for key, v in data.items():
        name = str(key).replace("-", "_")
        if name not in params:
            new = RENAMED_KEYS.get(name, f"no_{name}")
            if new in params:
                fail(f"{where}: key {key!r} is now {new!r} ({key}: false is {new}: true)")
            fail(f"{where}: unknown option {key!r} (valid: {', '.join(sorted(params))})")
        # Checked here, so that a bad value is named with its file and key in one line
        # (click would report it later naming the option, not the file). YAML's true/false
        # would pass as 1/0 for a number: only a switch takes them.
        if isinstance(v, bool) and not getattr(params[name], "is_flag", False):
            fail(f"{where}: {key}: {str(v).lower()} is for switches; this option takes a value")
        try:
            if v is not None and params[name].callback is None:  # converts and range-checks only
                params[name].process_value(ctx, v)
        except Exception as e:  # typer's BadParameter (its own click), or a type's own error
            fail(f"{where}: {key}: {e.format_message() if hasattr(e, 'format_message') else e}")
    defaults = {params[str(k).replace("-", "_")].name: v for k, v in data.items()}
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
