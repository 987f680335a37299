"""``mace-ray gc``: remove the shared artefacts that no run refers to.

Runs share training data by content address (``data/<key>/``, ``mace_ray.erase.layout.data_key``);
each run lists the keys it uses in ``runs/<run_id>/refs.json`` before it makes or reuses
any. Deleting a run's folder (or ``--no-resume``) leaves its data behind for other runs to
reuse; gc removes what no run lists. Like ``git gc`` it never touches what something still
refers to, and it refuses while a driver holds a run's lease (a run that is starting may be
about to refer to data that looks unreferenced). A run that finds its data gone makes it
again, so a gc that races a run costs time, never a wrong result.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from mace_core.errors import MaceError
from mace_ray.erase.layout import DATA_ROOT
from mace_ray.erase.locate import run_root
from mace_ray.storage.base import Storage, read_json
from mace_ray.storage.lease import lease_is_live
from mace_ray.storage.open_store import open_storage

log = logging.getLogger("mace_ray")


def _children(keys: Iterable[str], prefix: str) -> dict[str, list[str]]:
    """{first path part under ``prefix``: its keys}."""
    out: dict[str, list[str]] = {}
    for k in keys:
        name = k[len(prefix) + 1 :].split("/", 1)[0]
        out.setdefault(name, []).append(k)
    return out


def live_runs(storage: Storage) -> list[str]:
    """Run ids whose driver's lease (locks/<run_id>.json) is held now."""
    out = []
    for key in storage.list("locks"):
        if key.endswith(".json") and storage.exists(key):
            try:
                raw = storage.read_bytes(key)
            except MaceError:  # released while we looked
                continue
            if lease_is_live(raw):
                out.append(key.rsplit("/", 1)[-1][: -len(".json")])
    return sorted(out)


def referenced_data(storage: Storage) -> tuple[set[str], int]:
    """(data keys some run's refs.json lists, number of runs read)."""
    refs = [k for k in storage.list("runs") if k.endswith("/refs.json") and k.count("/") == 2]
    keys: set[str] = set()
    for key in refs:
        listed = read_json(storage, key)
        if not isinstance(listed, dict):  # valid JSON, but not what a run writes (hand-edited)
            raise MaceError(f"{storage.url}/{key}: not a mace-ray refs.json (expected a mapping)")
        data = listed.get("data") or {}
        if not isinstance(data, dict):
            raise MaceError(f"{storage.url}/{key}: 'data' is not a mapping of concepts to data keys")
        keys.update(str(v) for v in data.values())
    return keys, len(refs)


def collect_garbage(output: str, s3_endpoint: str | None = None, dry_run: bool = False) -> dict[str, Any]:
    """Delete (or, ``dry_run``, list) the data folders no run refers to; returns the counts.
    ``output``: a folder or s3:// URL, or a run's folder there (ROOT/runs/<run_id> stands for
    ROOT, as everywhere a command takes a run root: ``mace_ray.erase.locate``)."""
    storage = open_storage(run_root(output), s3_endpoint=s3_endpoint, must_exist=True)
    running = live_runs(storage)
    if running:
        raise MaceError(
            f"{storage.url}: run {running[0]} is running (its lease in locks/ is live); "
            "run gc when no erase is running on this output"
        )
    keep, runs = referenced_data(storage)
    stored = _children(storage.list(DATA_ROOT), DATA_ROOT)
    garbage = sorted(set(stored) - keep)
    files = sum(len(stored[k]) for k in garbage)
    for key in garbage:
        if not dry_run:
            storage.delete_prefix(f"{DATA_ROOT}/{key}")
    verb = "would remove" if dry_run else "removed"
    log.info(
        "gc: %d runs refer to %d data folders; %s %d unreferenced (%d files)",
        runs,
        len(set(stored) & keep),
        verb,
        len(garbage),
        files,
    )
    return {
        "output": storage.url,
        "runs": runs,
        "data_kept": len(set(stored) & keep),
        "data_removed" if not dry_run else "data_unreferenced": len(garbage),
        "files": files,
        "dry_run": dry_run,
    }
