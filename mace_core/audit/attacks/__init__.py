"""The audit's attacks: every subpackage of this package is one. Adding an attack is adding a
package: its ``__init__`` declares ``NAME`` (it joins ``--attacks``), ``TITLE`` and
``SETTINGS`` (they become ``--<name>-...`` options, ``AttackSettings``) without importing
torch, so that ``mace-ray audit --help`` and the request's checks stay fast; its ``attack``
module defines ``ATTACK`` (an ``mace_core.audit.base.Attack``), imported when an audit runs;
its results are a column of the report.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import field, make_dataclass
from functools import lru_cache
from types import ModuleType
from typing import TYPE_CHECKING, Any

from mace_core.errors import SettingError
from mace_core.options import Panel, group

if TYPE_CHECKING:  # the attacks import torch; their declarations do not
    from mace_core.audit.base import Attack

ALL = "all"


@lru_cache(maxsize=1)
def declarations() -> tuple[ModuleType, ...]:
    """Every attack's package (``NAME``, ``TITLE``, ``SETTINGS``), in package-name order."""
    found = sorted(info.name for info in pkgutil.iter_modules(__path__) if info.ispkg)
    return tuple(importlib.import_module(f"{__name__}.{name}") for name in found)


def attack_names() -> tuple[str, ...]:
    return tuple(pkg.NAME for pkg in declarations())


def parse_attacks(value: str) -> tuple[str, ...]:
    """``all`` or comma-separated attack names, in the order given; ValueError naming an unknown one."""
    names = attack_names()
    if value.strip().lower() == ALL:
        return names
    chosen = [v.strip().lower() for v in value.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in names]
    if unknown or not chosen:
        what = f"unknown attack {unknown[0]!r}" if unknown else "no attack named"
        if ALL in unknown:  # valid, but only alone: 'unknown' would contradict the list below
            what = f"{ALL!r} stands alone, not in a list"
        raise SettingError(f"--attacks: {what} (valid: {ALL}, {', '.join(names)})")
    return tuple(dict.fromkeys(chosen))


def _settings_class() -> type:
    """One frozen dataclass with a settings group per attack (prefix: the attack's name),
    so the command line and --config get every attack's options without listing them."""
    fields: list[tuple[str, type, Any]] = [
        (
            pkg.NAME.replace("-", "_"),
            pkg.SETTINGS,
            field(
                default_factory=pkg.SETTINGS,
                metadata=group(prefix=pkg.NAME, title=pkg.TITLE, panel=Panel.ATTACKS),
            ),
        )
        for pkg in declarations()
    ]
    cls = make_dataclass("AttackSettings", fields, frozen=True)
    cls.__module__ = __name__  # pickles (Ray) and reprs name this module
    cls.__doc__ = "Every attack's settings, one group per attack (its --<name>-... options)."
    return cls


AttackSettings = _settings_class()


def make_attack(name: str, settings: Any) -> Attack:
    """The attack ``name`` with its settings from an ``AttackSettings`` (its module imported now)."""
    for pkg in declarations():
        if name == pkg.NAME:
            cls = type(importlib.import_module(f"{pkg.__name__}.attack").ATTACK)
            return cls(getattr(settings, pkg.NAME.replace("-", "_")))
    raise ValueError(f"unknown attack {name!r} (valid: {', '.join(attack_names())})")
