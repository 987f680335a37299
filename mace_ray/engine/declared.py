"""What a stage reads and the marker it leaves, as declarations the runtime checks.

A ``Declared`` is the words of the docs table (``text``) and what ``run_stages`` checks of
them: storage keys that must exist (``keys``, a function of the run state) and state an
earlier stage must have left in the run (``held``: what is missing, by name). ``given``
declares an input that ``prepare`` has already checked, before anything was written.

Keys are checked by listing, not one request per key (S3 has no batch HEAD): keys are
grouped by folder, a folder with many wanted keys or a parent of many wanted folders is
listed once, and only a few scattered keys are asked for one by one (``Presence``). Keys
in a folder that holds far more than them (data/, shared by every run: 17 files a concept)
are declared ``scattered`` and asked for one by one, in parallel. A key found present is
not asked for again in the same run, so a stage's inputs that an earlier stage's marker
vouched for cost nothing. On a local folder every key is one stat, cheaper than a walk.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from mace_ray.storage.base import Storage
from mace_ray.storage.local import LocalStorage

Ctx = TypeVar("Ctx")

# Fewer wanted keys than this under one folder: one request each (in parallel) is cheaper
# than listing a folder that may hold much more (the shared data/ folder of every run).
LIST_FROM = 16


@dataclass(frozen=True)
class Declared(Generic[Ctx]):
    """A stage's inputs or its completion marker: words for the docs table, and the check."""

    text: str
    keys: Callable[[Ctx], Iterable[str]] | None = None  # storage keys that must exist
    held: Callable[[Ctx], Iterable[str]] | None = None  # what of the run's state is missing
    scattered: bool = False  # keys among many other files: asked one by one, never listed

    def missing(self, ctx: Ctx, presence: Presence) -> str | None:
        """The first thing missing, named (a storage key, or the state's name), or None."""
        for name in self.held(ctx) if self.held is not None else ():
            return name
        if self.keys is not None:
            absent = presence.missing(list(self.keys(ctx)), listing=not self.scattered)
            if absent:
                return absent[0]
        return None


def given(text: str) -> Declared[Any]:
    """An input ``prepare`` checked before anything was written: nothing left to check."""
    return Declared(text)


def stored(
    text: str, keys: Callable[[Ctx], Iterable[str]], *attributes: str, scattered: bool = False
) -> Declared[Ctx]:
    """Storage keys that must exist (and, optionally, attributes of the run's state)."""
    return Declared(text, keys, present(*attributes) if attributes else None, scattered)


def state(text: str, *attributes: str) -> Declared[Any]:
    """Attributes of the run's state that an earlier stage sets (they must not be None)."""
    return Declared(text, None, present(*attributes))


def present(*attributes: str) -> Callable[[Any], list[str]]:
    """The attributes of a run's state that are None, as a check (``Declared.held``)."""

    def check(ctx: Any) -> list[str]:
        return [f"run state {a!r}" for a in attributes if getattr(ctx, a, None) is None]

    return check


def _folder(key: str) -> str:
    return key.rpartition("/")[0]


class Presence:
    """Which keys of a storage exist, from as few requests as the keys allow (module doc).

    A key found present is trusted for the rest of the run (``verified``): stages add files,
    and the one that deletes some (cfr, damaged statistics) writes them again or fails.
    Listings and absent keys hold for one look only: ``look()`` after a stage has written."""

    def __init__(self, storage: Storage, threads: int = 16) -> None:
        self.storage = storage
        self.threads = threads
        # A local folder answers exists() with one stat: cheaper than walking the folder.
        self.lists = not isinstance(storage, LocalStorage)
        self.verified: set[str] = set()
        self.requests = 0  # listings and single requests made (for tests and benchmarks)
        self.look()

    def look(self) -> None:
        """Forget what was listed or found absent: the storage may have changed since."""
        self.listed: dict[str, set[str]] = {}  # prefix -> every key under it
        self.absent: set[str] = set()

    def _covered(self, key: str) -> set[str] | None:
        for prefix, keys in self.listed.items():
            if key.startswith(prefix + "/"):
                return keys
        return None

    def _list(self, prefix: str) -> None:
        if self._covered(prefix + "/x") is None:
            self.requests += 1
            self.listed[prefix] = set(self.storage.list(prefix))

    def _plan(self, todo: list[str]) -> list[str]:
        """List what is worth listing; returns the keys left to ask for one by one."""
        by_folder: dict[str, list[str]] = {}
        for k in todo:
            by_folder.setdefault(_folder(k), []).append(k)
        by_parent: dict[str, list[str]] = {}
        for folder in by_folder:
            if folder:
                by_parent.setdefault(_folder(folder), []).append(folder)
        single = list(by_folder.get("", []))
        for parent, folders in sorted(by_parent.items(), key=lambda kv: len(kv[0])):
            if parent and len(folders) >= LIST_FROM:  # many folders (a concept each): list their parent
                self._list(parent)
                continue
            for folder in folders:
                if len(by_folder[folder]) >= LIST_FROM:
                    self._list(folder)
                else:
                    single += by_folder[folder]
        return [k for k in single if self._covered(k) is None]

    def missing(self, keys: list[str], listing: bool = True) -> list[str]:
        """The keys that do not exist, in the order given. ``listing`` False: never list."""
        todo = [k for k in dict.fromkeys(keys) if k not in self.verified and k not in self.absent]
        todo = [k for k in todo if self._covered(k) is None]
        single = self._plan(todo) if listing and self.lists else todo
        if single:
            self.requests += len(single)
            with ThreadPoolExecutor(max_workers=min(self.threads, len(single))) as pool:
                found = dict(zip(single, pool.map(self.storage.exists, single), strict=True))
            self.verified.update(k for k, ok in found.items() if ok)
            self.absent.update(k for k, ok in found.items() if not ok)
        out = []
        for k in keys:
            listed = self._covered(k)
            if k in self.verified or (listed is not None and k in listed):
                self.verified.add(k)
            else:
                out.append(k)
        return out
