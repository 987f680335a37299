"""The audit job: attacks on an erased model's concepts, over a pool of audit workers.

Stages:
  1. prepare (driver, no models loaded): resolve the audited model (an erase run's folder
     also names its original model, its concepts and where its stored images are), the
     original model, the concepts with their variants and the attacks; derive the audit id
  2. attacks: a baseline job per concept and one job per (concept, attack) on
     ``AuditWorker``s (``WorkerPool``: bounded in-flight work, dead workers replaced and
     their job re-run); finished jobs (their marker holds) are reused
  3. report: report.json, summary.md, plots/*.png (mace_core.audit.report)
The same driver runs in this process (LocalBackend) or on a Ray cluster (RayBackend).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from mace_core.audit.concepts import AuditConcept, read_audit_concepts
from mace_core.concepts import Concept, ConceptType, concept_slug
from mace_core.errors import ConceptError, MaceError, ModelLoadError
from mace_core.evaluation.errors import MetricUnavailableError
from mace_core.evaluation.settings import DEFAULT_CLIP, TINY_CLIP
from mace_core.families import family_for
from mace_core.families.model_index import TINY_MODEL
from mace_core.pretrained import looks_like_path
from mace_ray.audit.layout import AuditLayout
from mace_ray.audit.request import AuditRequest
from mace_ray.audit.stages import AUDIT_STAGES, AuditRun
from mace_ray.engine.staged_job import run_staged_job
from mace_ray.eval.driver import ResolvedModel, locate_model
from mace_ray.storage.base import Storage, write_json
from mace_ray.storage.model_cache import is_remote, split_run
from mace_ray.storage.resolve import Sources

log = logging.getLogger("mace_ray")

# Families whose prompt encoders declare their text encoders (``PromptEncoder.text_towers``):
# the embedding attacks inject into every one of them.
AUDITABLE_FAMILIES = ("sd1", "sd2", "sdxl", "flux", "sd3")


@dataclass
class PreparedAudit:
    request: AuditRequest
    model: ResolvedModel
    original: str
    concepts: list[AuditConcept]
    attacks: tuple[str, ...]
    clip: str
    audit_id: str
    run_output: str | None = None  # the erase run's --output (local), for its stored images
    run_id: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def layout(self) -> AuditLayout:
        return AuditLayout(self.audit_id)

    def start(self, storage: Storage) -> None:
        """Before any worker starts: what is audited, in the log, and the audit's inputs, stored."""
        log.info(
            "audit %s: %d concepts x %d attacks (%s) of %s against %s",
            self.audit_id, len(self.concepts), len(self.attacks), ", ".join(self.attacks),
            self.model.spec, self.original,
        )  # fmt: skip
        write_json(storage, self.layout.inputs, self.inputs())

    def inputs(self) -> dict[str, Any]:
        """audit.json: what the audit id was derived from, readable."""
        return {
            "audit_id": self.audit_id,
            "model": self.model.load,
            "original": self.original,
            "concepts": [c.to_dict() for c in self.concepts],
            "attacks": list(self.attacks),
            "settings": self.request.settings.to_dict(),
            "clip": self.clip,
        }


def _erase_run(model: ResolvedModel) -> tuple[str | None, str | None]:
    """(the erase run's output, local or s3://, and its run id) when ``model`` is the
    pipeline of an erase run in its place (``ROOT/runs/<run_id>/final/pipeline``)."""
    parts = split_run(model.load) if model.manifest is not None else None
    if parts is None or parts[2] != "final/pipeline":
        return None, None
    return parts[0] or ".", parts[1]


def _check_family(model: str, what: str) -> None:
    """Refuse, before any worker starts, a local model the attacks cannot run on."""
    if model != TINY_MODEL and not (looks_like_path(model) and not is_remote(model)):
        return  # hub ids and s3:// folders are checked by the workers, which load them
    family = family_for(model)
    if family.name not in AUDITABLE_FAMILIES:
        raise ModelLoadError(
            f"{what} {model!r} is a {family.name} model; mace-ray audit supports "
            f"{', '.join(AUDITABLE_FAMILIES)}"
        )


def _same_model(spec: str, load: str, sources: Sources) -> bool:
    try:
        return locate_model(spec, sources=sources).load == load
    except MaceError:  # a folder that is not there (any more, or from here): not the same
        return False


def _concepts(req: AuditRequest, model: ResolvedModel) -> list[AuditConcept]:
    if req.concept_file:
        return read_audit_concepts(req.concept_file, req.default_type)
    if model.manifest is None:
        raise ConceptError(
            "give a concept file (CONCEPTS): the audited model is not an erase run, so it names no concepts"
        )
    return [
        AuditConcept(Concept(c["text"], ConceptType(c["type"]), c["anchor"]))
        for c in model.manifest.get("concepts", [])
    ]


def prepare(req: AuditRequest) -> PreparedAudit:
    """Stage 1, on the driver: everything that can be wrong with the inputs fails here, before
    any worker starts or anything is written."""
    if importlib.util.find_spec("matplotlib") is None:
        raise MetricUnavailableError("mace-ray audit plots with matplotlib: pip install 'mace-ray[eval]'")
    sources = Sources(req.s3_endpoint)
    model = locate_model(req.model, sources=sources)
    run_output, run_id = _erase_run(model)
    notes: list[str] = []
    base = model.manifest["model"] if model.manifest else None
    if req.original is None and base is None:
        raise ModelLoadError(
            "--original MODEL is required: the audited model is not an erase run, so it names no original"
        )
    if req.original:
        original = locate_model(req.original, "--original", sources).load
        if base is not None and not _same_model(str(base), original, sources):
            notes.append(
                f"--original {original} is not the erase run's model ({base}): its stored images are not used"
            )
            run_output = run_id = None
    else:
        original = locate_model(str(base), "the erase run's model (pass --original)", sources).load
    for m, what in ((model.load, "model"), (original, "--original")):
        _check_family(m, what)
    concepts = _concepts(req, model)
    if req.concept_file and model.manifest is not None:
        erased = {concept_slug(str(c["text"])) for c in model.manifest.get("concepts", [])}
        never = [c.concept.text for c in concepts if c.slug not in erased]
        if never:  # allowed (a bystander's leak is a baseline), but not what "erased" suggests
            more = f" and {len(never) - 5} more" if len(never) > 5 else ""
            notes.append(f"{len(never)} concept(s) the erase run did not erase: {', '.join(never[:5])}{more}")
            log.warning("audit: %s", notes[-1])
    attacks = req.attack_list
    clip = req.settings.clip or (TINY_CLIP if original == TINY_MODEL else DEFAULT_CLIP)
    if req.settings.images and clip == TINY_CLIP:
        notes.append(
            "image scorer: the built-in random tiny CLIP; its image leak rates exercise the code, "
            "they mean nothing"
        )
    if not req.settings.images:
        notes.append("--images 0: mechanistic figures only")
    # By content, not path: an audited folder changed in place (an erase rerun with
    # --no-resume to the same path) is another audit, never resumed from the old jobs; the
    # same run audited where it was written (s3://) or from a copy is the same audit (its
    # stored images are addressed by content and checked, wherever the run lives).
    key = {
        "model": sources.fingerprint(model.load).full,
        "original": sources.fingerprint(original).full,
        "concepts": [c.to_dict() for c in concepts],
        "attacks": list(attacks),
        "settings": req.settings.to_dict(),
        "clip": clip,
        "run_images": run_id,
    }
    audit_id = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return PreparedAudit(req, model, original, concepts, attacks, clip, audit_id, run_output, run_id, notes)


def run_audit(req: AuditRequest) -> dict[str, Any]:
    """Run an audit; returns the report. Raises MaceError on bad input."""
    return run_staged_job(req, prepare, AuditRun, AUDIT_STAGES)
