"""Storage keys of audits (local folder or s3://bucket/prefix, same keys).

audits/<audit_id>/audit.json                       inputs: models, concepts (with variants), settings
audits/<audit_id>/jobs/<slug>/baseline.json        the plain prompt's figures (completion marker)
audits/<audit_id>/jobs/<slug>/<attack>.json        one attack's result (completion marker, written last,
                                                   with the checksums of the files below)
audits/<audit_id>/jobs/<slug>/<attack>.safetensors the attack's learned input embeddings (sealed)
audits/<audit_id>/images/<slug>/<what>/<j>.png     images: original, erased (plain prompt), <attack>
audits/<audit_id>/report.json, summary.md, plots/<name>.png
"""

from __future__ import annotations

from dataclasses import dataclass

from mace_ray.storage.keys import ReportFolder, Under, safe_part

BASELINE = "baseline"


@dataclass(frozen=True)
class AuditLayout(ReportFolder):
    audit_id: str

    inputs = Under("audit.json")
    jobs = Under("jobs")

    @property
    def root(self) -> str:
        return f"audits/{safe_part(self.audit_id, 'audit id')}"

    def result(self, slug: str, job: str) -> str:
        """The completion marker of one job: ``baseline`` or an attack's name."""
        return f"{self.jobs}/{safe_part(slug, 'concept slug')}/{safe_part(job, 'job')}.json"

    def embedding(self, slug: str, attack: str) -> str:
        return f"{self.jobs}/{safe_part(slug, 'concept slug')}/{safe_part(attack, 'attack')}.safetensors"

    def image(self, slug: str, what: str, j: int) -> str:
        folder = f"{safe_part(slug, 'concept slug')}/{safe_part(what, 'image set')}"
        return f"{self.root}/images/{folder}/{j:03d}.png"
