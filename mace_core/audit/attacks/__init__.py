"""The audit's attacks: every module of this package that defines ``ATTACK`` (an
``mace_core.audit.base.Attack``) is one. Adding an attack is adding a module: its name joins
``--attacks``, its settings become ``--<name>-...`` options (``AttackSettings``) and its
results a column of the report.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import field, make_dataclass
from functools import lru_cache
from typing import Any

from mace_core.audit.base import Attack
from mace_core.errors import SettingError
from mace_core.options import Panel, group

ALL = "all"


@lru_cache(maxsize=1)
def attack_classes() -> tuple[type[Attack], ...]:
    """Every attack, in module-name order (found once, on first use)."""
    found = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        attack = getattr(importlib.import_module(f"{__name__}.{info.name}"), "ATTACK", None)
        if attack is not None:
            found.append(type(attack))
    return tuple(found)


def attack_names() -> tuple[str, ...]:
    return tuple(cls.name for cls in attack_classes())


def parse_attacks(value: str) -> tuple[str, ...]:
    """``all`` or comma-separated attack names, in the order given; ValueError naming an unknown one."""
    names = attack_names()
    if value.strip().lower() == ALL:
        return names
    chosen = [v.strip().lower() for v in value.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in names]
    if unknown or not chosen:
        what = f"unknown attack {unknown[0]!r}" if unknown else "no attack named"
        raise SettingError(f"--attacks: {what} (valid: {ALL}, {', '.join(names)})")
    return tuple(dict.fromkeys(chosen))


def _settings_class() -> type:
    """One frozen dataclass with a settings group per attack (prefix: the attack's name),
    so the command line and --config get every attack's options without listing them."""
    fields: list[tuple[str, type, Any]] = [
        (
            cls.name.replace("-", "_"),
            cls.settings_class,
            field(
                default_factory=cls.settings_class,
                metadata=group(prefix=cls.name, title=cls.title, panel=Panel.ATTACKS),
            ),
        )
        for cls in attack_classes()
    ]
    cls = make_dataclass("AttackSettings", fields, frozen=True)
    cls.__module__ = __name__  # pickles (Ray) and reprs name this module
    cls.__doc__ = "Every attack's settings, one group per attack (its --<name>-... options)."
    return cls


AttackSettings = _settings_class()


def make_attack(name: str, settings: Any) -> Attack:
    """The attack ``name`` with its settings from an ``AttackSettings``."""
    for cls in attack_classes():
        if cls.name == name:
            return cls(getattr(settings, cls.name.replace("-", "_")))
    raise ValueError(f"unknown attack {name!r} (valid: {', '.join(attack_names())})")
