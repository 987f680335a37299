"""Typer commands built from request dataclasses, and the parsed values built back into them.

``params_of(EraseRequest)`` walks a request and its nested settings (fields marked with the
metadata of mace_core/options.py) into ``CliParam``s: one per command-line name, each feeding
one field or, for shared options, several. ``command`` turns them into a function whose
``__signature__`` typer reads (``Annotated[type, typer.Option(...)]`` per parameter, plus
``--config`` and ``--help-all``) and which hands ``build``'s request to the command's body.
Help texts, panels, bounds and choices come only from the metadata and the field types. A
bool is one flag that turns its default around (``--squared-loss``, ``--no-resume``).
"""

from __future__ import annotations

import builtins
import dataclasses
import enum
import inspect
import keyword
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import typer

from mace_core.errors import MaceError, SettingError
from mace_core.options import CLI, Group, Internal, Option, cli_metadata
from mace_ray.cli.options import HELP_ALL, ConfigOpt, HelpAllOpt, fail

T = TypeVar("T")
FieldPath = tuple[str, ...]  # field names from the root, e.g. ("settings", "train", "seed")
REQUIRED = inspect.Parameter.empty


@dataclass
class CliParam:
    name: str  # the command-line name: --name (or NAME), the --config key
    option: Option  # the metadata that carries the help
    help: str
    panel: str | None
    field_type: Any  # the field's type, None stripped
    optional: bool  # the field may be None
    default: Any  # the field's default, REQUIRED if it has none
    targets: list[FieldPath]

    @property
    def ident(self) -> str:
        """The function parameter (and parsed value's) name: ``type_`` for ``--type``."""
        ident = self.name.replace("-", "_")
        return f"{ident}_" if keyword.iskeyword(ident) or hasattr(builtins, ident) else ident

    @property
    def flag(self) -> str:
        return self.name.upper() if self.option.argument else f"--{self.name}"

    def cli_type(self) -> Any:
        t = self.field_type
        if self.option.none_as:
            return str
        if typing.get_origin(t) is tuple:
            t = list[typing.get_args(t)[0]]
        return t | None if self.optional else t

    def cli_default(self) -> Any:
        if self.field_type is bool:
            return False  # the flag not given: the field keeps its default
        if self.default is REQUIRED:
            return REQUIRED
        if self.option.none_as:
            return self.option.none_as if self.default is None else str(self.default)
        if isinstance(self.default, tuple):
            return list(self.default)
        return self.default


def _unwrap_optional(t: Any) -> tuple[Any, bool]:
    if typing.get_origin(t) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(t) if a is not type(None)]
        if len(args) == 1 and len(args) < len(typing.get_args(t)):
            return args[0], True
    return t, False


def _field_default(f: dataclasses.Field, parent_default: Any) -> Any:
    if parent_default is not None:
        return getattr(parent_default, f.name)
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return REQUIRED


def params_of(root: type) -> list[CliParam]:
    """The command-line parameters of ``root``, in field order; TypeError for a field without
    metadata or two fields claiming one name without both saying ``shared``."""
    out: dict[str, CliParam] = {}
    _walk(root, (), Group(), None, out)
    params = list(out.values())
    for p in params:
        if not p.help:
            raise TypeError(f"option {p.flag} ({'.'.join(p.targets[0])}) has no help text")
        if not p.ident.isidentifier() or p.ident in ("config", HELP_ALL):
            raise TypeError(f"option name {p.name!r} cannot be a parameter name")
    return params


def _walk(cls: type, path: FieldPath, grp: Group, parent_default: Any, out: dict[str, CliParam]) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = cli_metadata(f)
        where = ".".join((cls.__name__, f.name))
        if meta is None:
            raise TypeError(
                f"{where} has no command-line metadata (mace_core/options.py: option, group, internal)"
            )
        if isinstance(meta, Internal):
            continue
        default = _field_default(f, parent_default)
        if isinstance(meta, Group):
            inner = Group(meta.prefix, meta.title, meta.panel or grp.panel)
            _walk(hints[f.name], (*path, f.name), inner, None if default is REQUIRED else default, out)
            continue
        name = meta.name or "-".join(x for x in (grp.prefix, f.name.replace("_", "-")) if x)
        field_type, optional = _unwrap_optional(hints[f.name])
        help = meta.help.replace("{group}", grp.title)
        if field_type is bool and default is True and not meta.name:  # the flag turns it off
            name, help = f"no-{name}", f"{help} (On unless this flag is given.)"
        p = CliParam(
            name=name,
            option=meta,
            help=help,
            panel=meta.panel or grp.panel,
            field_type=field_type,
            optional=optional,
            default=default,
            targets=[(*path, f.name)],
        )
        if name in out:
            _merge(out[name], p, where)
        else:
            out[name] = p


def _merge(first: CliParam, other: CliParam, where: str) -> None:
    """One option feeding several fields (--seed: train.seed and data.seed)."""
    if not (first.option.shared and other.option.shared):
        raise TypeError(f"{where}: option --{other.name} already feeds {'.'.join(first.targets[0])}")
    if (first.field_type, first.optional, first.default) != (other.field_type, other.optional, other.default):
        raise TypeError(f"{where}: shared option --{other.name} differs in type or default")
    if other.help and first.help and other.help != first.help:
        raise TypeError(f"{where}: shared option --{other.name} has two help texts")
    if other.help and not first.help:  # one of them carries the help
        first.option, first.help, first.panel = other.option, other.help, other.panel
    first.targets.append(other.targets[0])


def typer_info(p: CliParam, hidden: bool = False) -> Any:
    """The ``typer.Option`` / ``typer.Argument`` of one parameter (``hidden``: in --help-all only)."""
    o = p.option
    kw: dict[str, Any] = {"help": p.help, "rich_help_panel": p.panel, "hidden": hidden}
    if o.argument:
        kw["metavar"] = o.metavar or p.flag
    elif o.metavar or o.none_as:
        kw["metavar"] = o.metavar or f"<{p.field_type.__name__}|{o.none_as}>"
    if isinstance(p.field_type, type) and issubclass(p.field_type, enum.Enum):
        kw["case_sensitive"] = False
    if not o.none_as:  # checked by build: the type on the command line is a word or a number
        kw.update({k: v for k, v in (("min", o.min), ("max", o.max)) if v is not None})
    if o.argument:
        return typer.Argument(**kw)
    return typer.Option(*(f"--{n}" for n in (p.name, *o.aliases)), **kw)  # old spellings: more names


def annotated(meta: Mapping[str, Any], field_type: Any, name: str) -> Any:
    """``Annotated[type, typer.Option(...)]`` for a hand-written command's parameter from
    shared metadata (mace_ray/engine/requests.py), e.g. ``--executor`` of ``cache-prior``."""
    o = meta[CLI]
    base, optional = _unwrap_optional(field_type)
    p = CliParam(name, o, o.help, o.panel, base, optional, REQUIRED, [])
    return Annotated[p.cli_type(), typer_info(p)]


def signature(params: list[CliParam]) -> inspect.Signature:
    """Arguments first, then the options in field order (the help groups them by panel)."""

    def parameter(name: str, default: Any, annotation: Any) -> inspect.Parameter:
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)

    def info(p: CliParam) -> Any:  # --help shows what a first run needs, --help-all the rest
        return typer_info(p, hidden=not (p.option.basic or p.option.argument or p.default is REQUIRED))

    ordered = sorted(params, key=lambda p: not p.option.argument)
    own = [parameter(p.ident, p.cli_default(), Annotated[p.cli_type(), info(p)]) for p in ordered]
    return inspect.Signature(
        [*own, parameter("config", None, ConfigOpt), parameter(HELP_ALL, False, HelpAllOpt)]
    )


def build(root: type[T], values: Mapping[str, Any], params: list[CliParam] | None = None) -> T:
    """The request of parsed ``values`` (by parameter name); SettingError for a bad value."""
    params = params if params is not None else params_of(root)
    by_target = {t: p for p in params for t in p.targets}
    return _construct(root, (), by_target, dict(values))


def _construct(cls: type[T], path: FieldPath, by_target: dict[FieldPath, CliParam], values: dict) -> T:
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        meta = cli_metadata(f)
        here = (*path, f.name)
        if isinstance(meta, Group):
            kwargs[f.name] = _construct(hints[f.name], here, by_target, values)
        elif isinstance(meta, Option):
            p = by_target[here]
            kwargs[f.name] = _field_value(p, values[p.ident])
    return cls(**kwargs)


def _field_value(p: CliParam, value: Any) -> Any:
    if p.field_type is bool:
        return (not p.default) if value else p.default
    word = p.option.none_as
    if word:
        return _word_or_number(p, word, value)
    if isinstance(value, list) and typing.get_origin(p.field_type) is tuple:
        return tuple(value)
    return value


def _word_or_number(p: CliParam, word: str, value: Any) -> Any:
    """``--concepts-per-batch auto`` (None) or a number within the option's bounds."""
    text = str(value).strip()
    if text.lower() == word:
        return None
    o = p.option
    try:
        number = p.field_type(text)
    except ValueError:
        number = None
    if number is None or (o.min is not None and number < o.min) or (o.max is not None and number > o.max):
        bounds = " and ".join(f"{op} {b:g}" for op, b in ((">=", o.min), ("<=", o.max)) if b is not None)
        kind = "a positive integer" if p.field_type is int and o.min == 1 else f"a number {bounds}".strip()
        raise SettingError(f"{p.flag}: expected {kind} or {word}, got {value!r}")
    return number


def command(root: type[T], run: Callable[[T], None], name: str) -> Callable[..., None]:
    """A typer command function: its options are ``root``'s; it calls ``run(request)``."""
    params = params_of(root)

    def cmd(**values: Any) -> None:
        values.pop("config", None)  # already applied: load_config fills the other values
        values.pop(HELP_ALL, None)
        try:
            request = build(root, values, params)
        except MaceError as e:  # a SettingError; any other exception is a bug (mace_ray/cli/errors.py)
            fail(str(e))
        run(request)

    cmd.__signature__ = signature(params)  # type: ignore[attr-defined]
    cmd.__name__ = name
    cmd.__doc__ = run.__doc__
    return cmd
