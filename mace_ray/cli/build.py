"""Typer commands built from request dataclasses, and the parsed values built back into them.

``params_of(EraseRequest)`` walks a request and its nested settings (fields marked with the
metadata of mace_core/options.py) into ``CliParam``s: one per command-line name, each feeding
one field or, for shared options, several. ``command`` turns them into a function whose
``__signature__`` typer reads (``Annotated[type, typer.Option(...)]`` per parameter, plus
``--config``) and which hands ``build``'s request to the command's body. Help texts, panels,
bounds and choices come only from the metadata and the field types.
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

from mace_core.options import CLI, Group, Internal, Option, Panel, cli_metadata
from mace_ray.cli.options import ConfigOpt, fail

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
    alias_of: str | None = None  # a hidden deprecated spelling of that param

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
        return t | None if self.optional or self.alias_of else t

    def cli_default(self) -> Any:
        if self.alias_of:
            return None
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
    aliases = [
        CliParam(
            a, p.option, f"Deprecated spelling of {p.flag}.", p.panel, p.field_type, True, None, [], p.name
        )
        for p in params
        for a in p.option.aliases
    ]
    for p in params + aliases:
        if not p.ident.isidentifier() or p.ident == "config":
            raise TypeError(f"option name {p.name!r} cannot be a parameter name")
    return params + aliases


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
        p = CliParam(
            name=name,
            option=meta,
            help=meta.help.replace("{group}", grp.title),
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
    if other.help and not first.help:
        first.option, first.help, first.panel = other.option, other.help, other.panel
    first.targets.append(other.targets[0])


def _is_choice(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, enum.Enum)


def typer_info(p: CliParam) -> Any:
    """The ``typer.Option`` / ``typer.Argument`` of one parameter."""
    o = p.option
    kw: dict[str, Any] = {"help": p.help, "rich_help_panel": p.panel, "hidden": p.alias_of is not None}
    if o.argument:
        kw["metavar"] = o.metavar or p.flag
    elif o.metavar or o.none_as:
        kw["metavar"] = o.metavar or f"<{p.field_type.__name__}|{o.none_as}>"
    if _is_choice(p.field_type):
        kw["case_sensitive"] = False
    if not o.none_as:  # checked by build: the type on the command line is a word or a number
        kw.update({k: v for k, v in (("min", o.min), ("max", o.max)) if v is not None})
    if o.argument:
        return typer.Argument(**kw)
    if p.field_type is bool and not p.alias_of:
        return typer.Option(f"--{p.name}/--{o.negative or 'no-' + p.name}", **kw)
    return typer.Option(f"--{p.name}", **kw)


def annotated(meta: Mapping[str, Any], field_type: Any, name: str) -> Any:
    """``Annotated[type, typer.Option(...)]`` for a hand-written command's parameter from
    shared metadata (mace_ray/engine/requests.py), e.g. ``--executor`` of ``cache-prior``."""
    o = meta[CLI]
    base, optional = _unwrap_optional(field_type)
    p = CliParam(name, o, o.help, o.panel, base, optional, REQUIRED, [])
    return Annotated[p.cli_type(), typer_info(p)]


def signature(params: list[CliParam]) -> inspect.Signature:
    args = [p for p in params if p.option.argument]
    # Panels in the order of mace_core/options.py's Panel (typer shows them as they first
    # appear); fields in their order within a panel.
    order = Panel.order()
    options = sorted(
        (p for p in params if not p.option.argument),
        key=lambda p: order.index(p.panel) if p.panel in order else len(order),
    )

    def parameter(p: CliParam) -> inspect.Parameter:
        annotation = Annotated[p.cli_type(), typer_info(p)]
        return inspect.Parameter(
            p.ident, inspect.Parameter.KEYWORD_ONLY, default=p.cli_default(), annotation=annotation
        )

    config = inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=ConfigOpt)
    return inspect.Signature([*map(parameter, args), *map(parameter, options), config])


def build(root: type[T], values: Mapping[str, Any], params: list[CliParam] | None = None) -> T:
    """The request of parsed ``values`` (by parameter name); ValueError for a bad value."""
    params = params if params is not None else params_of(root)
    values = dict(values)
    by_name = {p.name: p for p in params}
    for alias in (p for p in params if p.alias_of):
        given = values.get(alias.ident)
        if given is None:
            continue
        main = by_name[alias.alias_of]
        if values.get(main.ident) != main.cli_default():
            raise ValueError(f"give {main.flag} or its old spelling {alias.flag}, not both")
        values[main.ident] = given
    by_target = {t: p for p in params if not p.alias_of for t in p.targets}
    return _construct(root, (), by_target, values)


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
    if p.field_type is int:
        kind = "a positive integer" if o.min == 1 and o.max is None else "an integer"
    else:
        kind = "a number"
    try:
        number = p.field_type(text)
    except ValueError:
        number = None
    if number is None or (o.min is not None and number < o.min) or (o.max is not None and number > o.max):
        bounds = "" if kind == "a positive integer" else _bounds(o)
        raise ValueError(f"{p.flag}: expected {kind}{bounds} or {word}, got {value!r}")
    return number


def _bounds(o: Option) -> str:
    parts = [f">= {o.min:g}" if o.min is not None else "", f"<= {o.max:g}" if o.max is not None else ""]
    shown = " and ".join(x for x in parts if x)
    return f" {shown}" if shown else ""


def command(root: type[T], run: Callable[[T], None], name: str) -> Callable[..., None]:
    """A typer command function: its options are ``root``'s; it calls ``run(request)``."""
    params = params_of(root)

    def cmd(**values: Any) -> None:
        values.pop("config", None)  # already applied: load_config fills the other values
        try:
            request = build(root, values, params)
        except ValueError as e:
            fail(str(e))
        run(request)

    cmd.__signature__ = signature(params)  # type: ignore[attr-defined]
    cmd.__name__ = name
    cmd.__doc__ = run.__doc__
    return cmd
