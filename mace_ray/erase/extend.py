"""``mace-ray erase MORE.txt --from RUN``: a run over an earlier run's concepts plus new ones.

Takedown requests arrive in waves; each wave is a new run over the union, because the
closed forms (CFR, fusion) are over every concept at once. What does not depend on the other
concepts is not made again: a concept's images and masks are stored by content address
(``mace_ray.erase.layout.data_key``) and depend only on the original model, the concept and the
data settings, so the union run makes the new concepts' data only. The run over the union
is exactly the run a fresh ``mace-ray erase`` over both lists would be (same run id), so its
weights are those of a fresh run.

The extension takes RUN's model, settings, retained set and prior captions from its
manifest; an option on the command line that says otherwise is refused rather than ignored.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass
from typing import Any

from mace_core.concepts import Concept, ConceptList, ConceptType
from mace_core.errors import ConceptError, MaceError
from mace_core.options import from_plain
from mace_core.settings import EraseSettings
from mace_ray.erase.layout import RunLayout
from mace_ray.erase.locate import locate_run
from mace_ray.erase.request import EraseRequest
from mace_ray.storage.base import Storage, read_json
from mace_ray.storage.resolve import Sources

log = logging.getLogger("mace_ray")

_RUN_ID = re.compile(r"^[0-9a-f]{16}$")


@dataclass(frozen=True)
class BaseRun:
    """What an extension keeps of the run it extends."""

    run_id: str
    concepts: list[Concept]
    retain: list[Concept]


def _concepts(entries: Any, where: str) -> list[Concept]:
    try:
        return [Concept(str(e["text"]), ConceptType(e["type"]), str(e["anchor"])) for e in entries]
    except (KeyError, TypeError, ValueError):
        raise MaceError(f"{where}: its concept list is not readable") from None


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"data.images_per_concept": 8, ...} of nested settings."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _differs(given: Any, default: Any, base: Any) -> bool:
    """Whether the command line set ``name`` to something other than the base run's."""
    return given != default and given != base


def extend_request(
    storage: Storage, req: EraseRequest, sources: Sources | None = None
) -> tuple[EraseRequest, BaseRun]:
    """The request of the union run, and the run it extends. MaceError (one line) when RUN
    does not exist or an option contradicts it. RUN: a run id under the output (``storage``),
    or the path or s3:// URL of a run's folder anywhere (``mace_ray.erase.locate``; its
    manifest is read there, the union run is written under the output)."""
    run = req.extend or ""
    flag = f"--from {run!r}"
    sources = sources or Sources(req.s3_endpoint, output=storage)
    if "/" in run:
        ref = locate_run(run, None, req.s3_endpoint, sources, flag="--from")
        storage, run = ref.storage, ref.run_id
    elif not _RUN_ID.match(run):
        raise MaceError(
            f"{flag}: not a run id (16 hex digits, as `mace-ray erase` prints) nor a run's folder"
        )
    layout = RunLayout(run)
    if not storage.exists(layout.manifest):
        raise MaceError(f"{flag}: no such run under {storage.url}/runs/")
    where = f"{storage.url}/{layout.manifest}"
    manifest = read_json(storage, layout.manifest)
    try:
        settings = from_plain(EraseSettings, manifest["settings"])
        model = str(manifest["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise MaceError(f"{where}: not a mace-ray manifest this version can extend ({e})") from None
    defaults = EraseRequest(concept_file="")
    if _differs(req.model, defaults.model, model):
        raise MaceError(f"{flag}: the run erases from model {model!r}; drop --model (an extension keeps it)")
    if _differs(req.settings, defaults.settings, settings):
        given, default, base = (_flat(x.to_dict()) for x in (req.settings, defaults.settings, settings))
        # Name a setting the command line changed (not one the run merely had otherwise).
        key = next(k for k in given if given[k] != default[k] and given[k] != base[k])
        raise MaceError(
            f"{flag}: setting {key} = {given[key]!r} differs from the run's {base[key]!r}; an extension "
            "keeps the run's settings, so drop the settings options (or start a new run without --from)"
        )
    if req.retain_file is not None:
        raise MaceError(f"{flag}: the run's retained set is kept; drop --retain")
    captions = manifest.get("prior_captions", "builtin")
    captions = None if captions == "builtin" else str(captions)
    if req.prior_captions is not None and req.prior_captions != captions:
        raise MaceError(f"{flag}: the run's prior captions are kept; drop --prior-captions")
    method = manifest.get("method") or req.method  # a closed-form-only run grows as one
    base = BaseRun(
        run, _concepts(manifest.get("concepts"), where), _concepts(manifest.get("retain", []), where)
    )
    union = dataclasses.replace(
        req, model=model, settings=settings, prior_captions=captions, method=method, extend=None
    )
    return union, base


def merge_concepts(base: BaseRun, new: ConceptList) -> ConceptList:
    """The base run's concepts, then the new ones it does not have (in file order)."""
    have = {c.key for c in base.concepts}
    clash = [c for c in new.concepts if c.key in {r.key for r in base.retain}]
    if clash:
        raise ConceptError(
            f"{new.source}: concept {clash[0].text!r} is in the retained set of run {base.run_id}"
        )
    added = [c for c in new.concepts if c.key not in have]
    known = [c.text for c in new.concepts if c.key in have]
    if known:
        log.info("%s: %d concepts are already in run %s: %s", new.source, len(known), base.run_id, known[:5])
    return ConceptList(base.concepts + added, new.duplicates, new.source)
