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

import re
from dataclasses import dataclass

_ID = re.compile(r"^[a-z0-9][a-z0-9-]*$")
BASELINE = "baseline"


def _safe(value: str, what: str) -> str:
    if not _ID.match(value):
        raise ValueError(f"unsafe {what} {value!r}")
    return value


@dataclass(frozen=True)
class AuditLayout:
    audit_id: str

    @property
    def root(self) -> str:
        return f"audits/{_safe(self.audit_id, 'audit id')}"

    @property
    def inputs(self) -> str:
        return f"{self.root}/audit.json"

    @property
    def jobs(self) -> str:
        return f"{self.root}/jobs"

    def result(self, slug: str, job: str) -> str:
        """The completion marker of one job: ``baseline`` or an attack's name."""
        return f"{self.jobs}/{_safe(slug, 'concept slug')}/{_safe(job, 'job')}.json"

    def embedding(self, slug: str, attack: str) -> str:
        return f"{self.jobs}/{_safe(slug, 'concept slug')}/{_safe(attack, 'attack')}.safetensors"

    def image(self, slug: str, what: str, j: int) -> str:
        return f"{self.root}/images/{_safe(slug, 'concept slug')}/{_safe(what, 'image set')}/{j:03d}.png"

    @property
    def report(self) -> str:
        return f"{self.root}/report.json"

    @property
    def summary(self) -> str:
        return f"{self.root}/summary.md"

    def plot(self, name: str) -> str:
        if not re.match(r"^[a-z0-9_-]+\.png$", name):
            raise ValueError(f"unsafe plot name {name!r}")
        return f"{self.root}/plots/{name}"
