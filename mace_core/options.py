"""How settings fields appear on the command line, as plain data (no CLI library here): each
field's metadata ``"cli"`` is an ``Option``, a ``Group`` (a nested settings dataclass) or
``Internal`` (not on the command line); mace_ray/cli/build.py makes the commands of them. A field
with a fixed set of values is a ``Choice``: a str enum that formats and serialises as its value."""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from mace_core.errors import SettingError

CLI = "cli"  # the metadata key


class Panel:
    """Sections of ``--help``, in the order they are shown."""

    MODEL = "Model and output"
    SUITE = "Suite"
    ATTACKS = "Attacks"
    DATA = "Data (images and masks)"
    TRAIN = "Training (LoRA)"
    CLOSED_FORMS = "Closed forms"
    GENERATION = "Generation"
    SCORING = "Scoring"
    CLUSTER = "Cluster and devices"
    RUN = "Run control"


@dataclass(frozen=True)
class Option:
    """A field set from the command line. ``name``: the option (``--name``), argument or
    ``--config`` key; default: the field name with dashes, after the group's prefix. A bool is one
    flag that turns its default around: ``--<name>`` for a False default, ``--no-<name>`` for a
    True one (``name`` names that flag, e.g. ``quiet``). ``help`` may say ``{group}`` for the
    group's title. ``shared``: the same name feeds every field that declares it (all must say so,
    with the same type and default; one carries the help). ``none_as``: the word that spells None
    (``auto``). ``aliases``: hidden old names. ``min``/``max``: bounds checked while parsing.
    ``basic``: in the short ``--help`` (what a first run needs); all are in ``--help-all``."""

    help: str = ""
    name: str | None = None
    panel: str | None = None
    min: float | None = None
    max: float | None = None
    shared: bool = False
    none_as: str | None = None
    argument: bool = False
    aliases: tuple[str, ...] = ()
    metavar: str | None = None
    basic: bool = False


@dataclass(frozen=True)
class Group:
    """A nested settings dataclass: its fields are options, named after ``prefix``."""

    prefix: str = ""
    title: str = ""
    panel: str | None = None


@dataclass(frozen=True)
class Internal:
    """Deliberately not on the command line; ``why`` says why (for the reader)."""

    why: str


def option(help: str = "", **kw: Any) -> dict[str, Option]:
    return {CLI: Option(help=help, **kw)}


def group(**kw: Any) -> dict[str, Group]:
    return {CLI: Group(**kw)}


def internal(why: str) -> dict[str, Internal]:
    return {CLI: Internal(why)}


def cli_metadata(f: dataclasses.Field) -> Option | Group | Internal | None:
    return f.metadata.get(CLI)


def setting(default: Any = dataclasses.MISSING, help: str = "", **kw: Any) -> Any:
    """A settings field set from the command line: ``field(default=..., metadata=option(...))``."""
    return dataclasses.field(default=default, metadata=option(help, **kw))


def seconds(default: float | None, help: str, name: str, panel: str) -> Any:
    """A duration in seconds (never negative): field ``<name>_s``, option ``--<name>``."""
    return setting(default, help, name=name, min=0.0, panel=panel)


def argument(help: str, default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    """A positional argument of the command (``setting``'s counterpart for options)."""
    return dataclasses.field(default=default, metadata=option(help, argument=True, **kw))


def unwrap_optional(t: Any) -> tuple[Any, bool]:
    """``(X, True)`` for ``X | None``, else ``(t, False)``."""
    args = [a for a in typing.get_args(t) if a is not type(None)]
    if typing.get_origin(t) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0], True
    return t, False


class Choice(str, enum.Enum):
    """A str-valued enum whose members print, format and serialise as their value."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)

    @classmethod
    def parse(cls: type[C], value: Any, what: str) -> C:
        """``value`` (a member or its string) as a member; SettingError naming ``what`` if none."""
        try:
            return cls(value)
        except ValueError:
            raise SettingError(f"unknown {what} {value!r} (valid: {', '.join(cls.values())})") from None


C = TypeVar("C", bound=Choice)
T = TypeVar("T")


def coerce_choices(obj: Any, names: Mapping[str, tuple[type[Choice], str]]) -> None:
    """In a frozen dataclass's ``__post_init__``: strings given for choice fields become members,
    so that settings made in code (``masker="whole-image"``) and on the command line are equal."""
    for name, (cls, what) in names.items():
        object.__setattr__(obj, name, cls.parse(getattr(obj, name), what))


def plain(value: Any) -> Any:
    """``dataclasses.asdict`` output with choices as their plain strings (JSON, YAML, hashes)."""
    if isinstance(value, Choice):
        return value.value
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(plain(v) for v in value)
    return value


def from_plain(cls: type[T], values: Mapping[str, Any]) -> T:
    """The settings dataclass that ``plain(dataclasses.asdict(obj))`` came from (a run's manifest
    or report): groups rebuilt, choices parsed by their fields' checks; ValueError for a key the
    dataclass does not have."""
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown setting {unknown[0]!r}")
    kwargs = dict(values)
    for name, value in values.items():
        t = unwrap_optional(hints[name])[0]
        if dataclasses.is_dataclass(t) and isinstance(value, Mapping):
            kwargs[name] = from_plain(t, value)
        elif typing.get_origin(t) is tuple and isinstance(value, list):
            kwargs[name] = tuple(value)
    return cls(**kwargs)


def check_bounds(obj: Any) -> None:
    """The ``min``/``max`` that ``obj``'s fields declare (the bounds the command line checks),
    checked again on the object itself: settings made in code, read from a ``--config`` file or
    from a manifest obey them too. SettingError naming the field; NaN is refused."""
    for f in dataclasses.fields(obj):
        o, value = cli_metadata(f), getattr(obj, f.name)
        if not isinstance(o, Option) or value is None or (o.min is None and o.max is None):
            continue
        low = -math.inf if o.min is None else o.min
        high = math.inf if o.max is None else o.max
        if not low <= value <= high:
            if o.min is not None and o.max is not None:
                bounds = f"in [{low:g}, {high:g}]"
            else:
                bounds = f">= {low:g}" if o.max is None else f"<= {high:g}"
            raise SettingError(f"{f.name} must be {bounds}, got {value}")


@functools.cache
def _choice_fields(cls: type) -> dict[str, type[Choice]]:
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        t = unwrap_optional(hints[f.name])[0]
        if isinstance(t, type) and issubclass(t, Choice):
            out[f.name] = t
    return out


@dataclass(frozen=True)
class Settings:
    """Base of every settings dataclass: once made (in code, from the command line, a config file
    or a manifest), its choice fields hold members (a string becomes its member) and its numbers
    lie within the bounds their fields declare. Subclasses with checks of their own call
    ``super().__post_init__()`` first."""

    def __post_init__(self) -> None:
        choices = _choice_fields(type(self))
        coerce_choices(self, {name: (cls, name) for name, cls in choices.items()})
        check_bounds(self)
