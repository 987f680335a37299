"""Typer commands built from request dataclasses, and the parsed values built back into them.

``params_of`` walks a request and its nested settings (their fields' metadata: mace_core/options.py)
into ``CliParam``s, one per command-line name, each feeding one field or (shared) several.
``command`` gives them to typer as a function's ``__signature__`` (plus ``--config`` and
``--help-all``) that runs the command on ``build``'s request. Help, panels, bounds and choices
come only from the metadata and the field types."""

from __future__ import annotations

import builtins
import dataclasses
import enum
import inspect
import keyword
import typing
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass
from typing import Annotated, Any, TypeVar

import typer

from mace_core.errors import MaceError, SettingError
from mace_core.options import CLI, Group, Internal, Option, cli_metadata, unwrap_optional
from mace_ray.cli.options import HELP_ALL, ConfigOpt, HelpAllOpt, fail, type_word

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

    def annotation(self) -> Any:
        """``Annotated[type, typer.Option(...)]`` (or ``typer.Argument``), in ``--help`` if a first
        run needs it, else in ``--help-all`` only; a None-word option is text (``value`` checks it)."""
        o, t = self.option, self.field_type
        hidden = not (o.basic or o.argument or self.default is REQUIRED)
        kw: dict[str, Any] = {"help": self.help, "rich_help_panel": self.panel, "hidden": hidden}
        if o.argument or o.metavar or o.none_as:
            kw["metavar"] = o.metavar or (self.flag if o.argument else f"{type_word(t.__name__)}|{o.none_as}")
        if isinstance(t, type) and issubclass(t, enum.Enum):
            kw["case_sensitive"] = False
        if o.none_as:
            t = str
        else:
            kw.update({k: v for k, v in (("min", o.min), ("max", o.max)) if v is not None})
            t = list[typing.get_args(t)[0]] if typing.get_origin(t) is tuple else t
            t = t | None if self.optional else t
        names = (f"--{n}" for n in (self.name, *o.aliases))  # old spellings: more names
        return Annotated[t, typer.Argument(**kw) if o.argument else typer.Option(*names, **kw)]

    def cli_default(self) -> Any:
        if self.field_type is bool:
            return False  # the flag not given: the field keeps its default
        if self.default is REQUIRED or not self.option.none_as:
            return list(self.default) if isinstance(self.default, tuple) else self.default
        return self.option.none_as if self.default is None else str(self.default)

    def value(self, raw: Any) -> Any:
        """The field's value for the parsed ``raw``; SettingError for a None-word option
        (``--concepts-per-batch auto``) given neither the word nor a number within its bounds."""
        o, t = self.option, self.field_type
        if t is bool:
            return (not self.default) if raw else self.default
        if not o.none_as:
            return tuple(raw) if isinstance(raw, list) and typing.get_origin(t) is tuple else raw
        text = str(raw).strip()
        if text.lower() == o.none_as:
            return None
        try:
            number = t(text)
        except ValueError:
            number = None
        if number is None or (o.min is not None and number < o.min) or (o.max is not None and number > o.max):
            bounds = " and ".join(f"{op} {b:g}" for op, b in ((">=", o.min), ("<=", o.max)) if b is not None)
            kind = "a positive integer" if t is int and o.min == 1 else f"a number {bounds}".strip()
            raise SettingError(f"{self.flag}: expected {kind} or {o.none_as}, got {raw!r}")
        return number


def params_of(root: type) -> list[CliParam]:
    """The command-line parameters of ``root``, in field order; TypeError for a field without
    metadata or two fields claiming one name without both saying ``shared``."""
    out: dict[str, CliParam] = {}
    _walk(root, (), Group(), None, out)
    for p in out.values():
        if not p.help:
            raise TypeError(f"option {p.flag} ({'.'.join(p.targets[0])}) has no help text")
        if not p.ident.isidentifier() or p.ident in ("config", HELP_ALL):
            raise TypeError(f"option name {p.name!r} cannot be a parameter name")
    return list(out.values())


def _walk(cls: type, path: FieldPath, grp: Group, parent_default: Any, out: dict[str, CliParam]) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta, where = cli_metadata(f), f"{cls.__name__}.{f.name}"
        if meta is None:
            raise TypeError(
                f"{where} has no command-line metadata (mace_core/options.py: option, group, internal)"
            )
        if isinstance(meta, Internal):
            continue
        default = f.default if parent_default is None else getattr(parent_default, f.name)
        if parent_default is None and f.default_factory is not MISSING:
            default = f.default_factory()
        default = REQUIRED if default is MISSING else default
        if isinstance(meta, Group):
            inner = Group(meta.prefix, meta.title, meta.panel or grp.panel)
            _walk(hints[f.name], (*path, f.name), inner, None if default is REQUIRED else default, out)
            continue
        name = meta.name or "-".join(x for x in (grp.prefix, f.name.replace("_", "-")) if x)
        field_type, optional = unwrap_optional(hints[f.name])
        help = meta.help.replace("{group}", grp.title)
        if field_type is bool and default is True and not meta.name:  # the flag turns it off
            name, help = f"no-{name}", f"{help} (On unless this flag is given.)"
        p = CliParam(
            name, meta, help, meta.panel or grp.panel, field_type, optional, default, [(*path, f.name)]
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
    first.targets += other.targets


def annotated(meta: Mapping[str, Any], field_type: Any, name: str) -> Any:
    """``Annotated[type, typer.Option(...)]`` for a hand-written command's parameter from
    shared metadata (mace_ray/engine/requests.py), e.g. ``--executor`` of ``cache-prior``."""
    o = meta[CLI]
    return CliParam(name, o, o.help, o.panel, *unwrap_optional(field_type), REQUIRED, []).annotation()


def build(root: type[T], values: Mapping[str, Any], params: list[CliParam] | None = None) -> T:
    """The request of parsed ``values`` (by parameter name); SettingError for a bad value."""
    by_target = {t: p for p in (params if params is not None else params_of(root)) for t in p.targets}

    def construct(cls: type, path: FieldPath) -> Any:
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            here, meta = (*path, f.name), cli_metadata(f)
            if isinstance(meta, Group):
                kwargs[f.name] = construct(typing.get_type_hints(cls)[f.name], here)
            elif isinstance(meta, Option):
                kwargs[f.name] = by_target[here].value(values[by_target[here].ident])
        return cls(**kwargs)

    return construct(root, ())


def command(root: type[T], run: Callable[[T], None], name: str) -> Callable[..., None]:
    """A typer command function: its options are ``root``'s; it calls ``run(request)``. Its
    arguments come first, then the options in field order (the help groups them by panel)."""
    params = params_of(root)

    def cmd(**values: Any) -> None:  # --config's values are already in: load_config
        try:
            request = build(root, values, params)
        except MaceError as e:  # a SettingError; any other exception is a bug (mace_ray/cli/errors.py)
            fail(str(e))
        run(request)

    def parameter(name: str, default: Any, annotation: Any) -> inspect.Parameter:
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)

    ordered = sorted(params, key=lambda p: not p.option.argument)
    own = [parameter(p.ident, p.cli_default(), p.annotation()) for p in ordered]
    cmd.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [*own, parameter("config", None, ConfigOpt), parameter(HELP_ALL, False, HelpAllOpt)]
    )
    cmd.__name__, cmd.__doc__ = name, run.__doc__
    return cmd
