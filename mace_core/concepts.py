"""Concepts to erase: their types, default anchors, the concept-file syntax and slugs.

Concept file syntax (one concept per line)::

    # lines starting with '#' and blank lines are ignored
    Bill Clinton
    Van Gogh | style
    dog | object | ground
    Angelina Jolie | | a woman

Fields are ``text | type | anchor``, separated by ``|``; surrounding spaces are
stripped and an empty field means "default" (the last line keeps the default type). Types are
``object``, ``celebrity``, ``style`` and ``explicit``; a missing type takes the
file-wide default (CLI ``--type``), a missing anchor the type's default anchor.
"""

from __future__ import annotations

import enum
import hashlib
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from mace_core.errors import ConceptError, quoted


class ConceptType(str, enum.Enum):
    OBJECT = "object"
    CELEBRITY = "celebrity"
    STYLE = "style"
    EXPLICIT = "explicit"

    @classmethod
    def parse(cls, value: str, where: str) -> ConceptType:
        try:
            return cls(value.strip().lower())
        except ValueError:
            valid = ", ".join(t.value for t in cls)
            raise ConceptError(
                f"{where}: unknown concept type {quoted(value, 30)} (valid: {valid})"
            ) from None


# The generic phrases that replace a concept (the paper's "mapping concepts").
# Objects: the paper picks a scene word per class ("sky", "ground", "street"); "scene"
# is the neutral default. Object concepts are bare nouns ("dog"): templates say "the {}".
DEFAULT_ANCHORS: dict[ConceptType, str] = {
    ConceptType.OBJECT: "scene",
    ConceptType.CELEBRITY: "a person",
    ConceptType.STYLE: "art",
    ConceptType.EXPLICIT: "a person wearing clothes",
}


@dataclass(frozen=True)
class Concept:
    """One concept to erase and the phrase it is mapped to."""

    text: str
    type: ConceptType
    anchor: str

    @property
    def key(self) -> str:
        """Identity used for duplicate detection: case and spacing do not matter."""
        return " ".join(self.text.lower().split())

    @property
    def slug(self) -> str:
        return concept_slug(self.text)

    def to_dict(self) -> dict[str, str]:
        return {"text": self.text, "type": self.type.value, "anchor": self.anchor}


def concept_slug(text: str) -> str:
    """A filesystem- and S3-safe folder name: readable part plus a hash of the exact text.

    Only ``[a-z0-9-]`` survive, so a slug can never contain ``/`` or ``..`` and never
    escapes its prefix; the hash keeps distinct texts apart after that folding.
    """
    norm = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    readable = re.sub(r"[^a-z0-9]+", "-", norm).strip("-")[:48].strip("-") or "concept"
    digest = hashlib.sha256(" ".join(text.lower().split()).encode()).hexdigest()[:8]
    return f"{readable}-{digest}"


@dataclass
class ConceptList:
    """Parsed concept file: unique concepts in file order plus what was dropped."""

    concepts: list[Concept]
    duplicates: list[dict[str, object]] = field(default_factory=list)
    source: str = ""


def make_concept(text: str, type_: ConceptType, anchor: str | None, where: str) -> Concept:
    text = " ".join(text.split())
    if not text:
        raise ConceptError(f"{where}: concept is empty")
    anchor = " ".join((anchor or "").split()) or DEFAULT_ANCHORS[type_]
    if anchor.lower() == text.lower():
        raise ConceptError(f"{where}: concept {quoted(text)} is mapped to itself")
    return Concept(text=text, type=type_, anchor=anchor)


def parse_concept_lines(
    lines: list[str], source: str, default_type: ConceptType = ConceptType.OBJECT
) -> ConceptList:
    """Parse concept-file lines (syntax in the module docstring); duplicates keep the first."""
    concepts: list[Concept] = []
    duplicates: list[dict[str, object]] = []
    seen: dict[str, int] = {}
    for lineno, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source}:{lineno}"
        parts = [p.strip() for p in line.split("|")]
        if len(parts) > 3:
            raise ConceptError(f"{where}: expected 'text | type | anchor', got {len(parts)} fields")
        type_ = ConceptType.parse(parts[1], where) if len(parts) > 1 and parts[1] else default_type
        anchor = parts[2] if len(parts) > 2 else None
        concept = make_concept(parts[0], type_, anchor, where)
        if concept.key in seen:
            duplicates.append({"line": lineno, "text": concept.text, "first_line": seen[concept.key]})
            continue
        seen[concept.key] = lineno
        concepts.append(concept)
    if not concepts:
        raise ConceptError(f"{source}: no concepts (the file is empty or only has comments)")
    return ConceptList(concepts=concepts, duplicates=duplicates, source=source)


def concept_file_lines(path: str | Path) -> list[str]:
    """The lines of a concept file (erase or audit); a missing or unreadable file is a ConceptError."""
    p = Path(path)
    if not p.is_file():
        raise ConceptError(f"concept file {str(path)!r} does not exist or is not a file")
    try:
        # utf-8-sig: a byte-order mark (Notepad, Excel) is not part of the first concept.
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise ConceptError(f"concept file {str(path)!r} cannot be read: {e}") from None
    return text.splitlines()


def read_concept_file(path: str | Path, default_type: ConceptType = ConceptType.OBJECT) -> ConceptList:
    """Read and parse a concept file; a missing or unreadable file is a ConceptError."""
    return parse_concept_lines(concept_file_lines(path), str(path), default_type)
