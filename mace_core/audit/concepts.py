"""The concepts an audit attacks, with the indirect phrasings the user knows of.

An audit's concept file is an erase concept file (``mace_core.concepts``) with two more
optional fields, each a ``;``-separated list::

    text | type | anchor | aliases | descriptions
    Bill Clinton | celebrity | | William Clinton; Bill Jefferson Clinton | the 42nd US president
    airplane | object | sky | aeroplane; avion; Flugzeug | a winged aircraft with jet engines

Aliases (other names, other languages) and descriptions are what the indirect-prompt attack
tries besides the phrasings it generates itself (``attacks/indirect.py``). An erase concept
file is a valid audit concept file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mace_core.concepts import Concept, ConceptType, concept_file_lines, parse_concept_lines
from mace_core.errors import ConceptError

FIELDS = "text | type | anchor | aliases | descriptions"


@dataclass(frozen=True)
class AuditConcept:
    concept: Concept
    aliases: tuple[str, ...] = ()
    descriptions: tuple[str, ...] = ()

    @property
    def slug(self) -> str:
        return self.concept.slug

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.concept.to_dict(),
            "aliases": list(self.aliases),
            "descriptions": list(self.descriptions),
        }


def _phrases(field: str) -> tuple[str, ...]:
    return tuple(p for p in (" ".join(x.split()) for x in field.split(";")) if p)


def parse_audit_lines(
    lines: list[str], source: str, default_type: ConceptType = ConceptType.OBJECT
) -> list[AuditConcept]:
    """Concepts of an audit concept file (module doc), in file order; a duplicate concept
    keeps its first line, aliases and descriptions included."""
    base: list[str] = []
    extra: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {}
    for lineno, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            base.append("")  # keeps line numbers for the erase parser's messages
            continue
        parts = [p.strip() for p in line.split("|")]
        if len(parts) > 5:
            raise ConceptError(f"{source}:{lineno}: expected '{FIELDS}', got {len(parts)} fields")
        base.append(" | ".join(parts[:3]))
        key = " ".join(parts[0].lower().split())  # Concept.key
        rest = parts[3:] + ["", ""]
        extra.setdefault(key, (_phrases(rest[0]), _phrases(rest[1])))
    concepts = parse_concept_lines(base, source, default_type).concepts
    return [AuditConcept(c, *extra.get(c.key, ((), ()))) for c in concepts]


def read_audit_concepts(
    path: str | Path, default_type: ConceptType = ConceptType.OBJECT
) -> list[AuditConcept]:
    """Read an audit concept file; a missing or unreadable file is a ConceptError."""
    return parse_audit_lines(concept_file_lines(path), str(Path(path)), default_type)
