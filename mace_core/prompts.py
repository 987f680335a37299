"""Prompt templates per concept type and the concept/anchor prompt pairs (MACE Stage 0).

Templates are our own (``mace_core/data/templates/<type>.txt``, one per line, ``{}``
marks the concept). Each concept prompt has a twin in which the concept is replaced by
its anchor; CFR maps the first onto the second. A second, disjoint set of templates
(``data/heldout/<type>.txt``) is never trained on: the erasure report measures on it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING

from mace_core.concepts import Concept, ConceptType

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

# Stage 2 data generation prompts: one fixed prompt per type.
GENERATION_PROMPTS: dict[ConceptType, str] = {
    ConceptType.OBJECT: "a photo of the {}",
    ConceptType.CELEBRITY: "a photo of {}",
    ConceptType.STYLE: "a painting in the style of {}",
    ConceptType.EXPLICIT: "a photo of {}",
}


def _lines(path: str) -> tuple[str, ...]:
    """The non-empty lines of a packaged data file, stripped."""
    text = resources.files("mace_core").joinpath(path).read_text("utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def _template_file(path: str) -> tuple[str, ...]:
    out = _lines(path)
    bad = [t for t in out if t.count("{}") != 1]
    if bad:  # a packaging error, not a user error
        raise RuntimeError(f"template file {path} has lines without exactly one '{{}}': {bad[:3]}")
    return out


@cache
def templates(type_: ConceptType) -> tuple[str, ...]:
    """The prompt templates of a concept type, in file order."""
    return _template_file(f"data/templates/{type_.value}.txt")


@cache
def heldout_templates(type_: ConceptType) -> tuple[str, ...]:
    """Templates of a type that no training or statistics prompt uses (the erasure report's)."""
    return _template_file(f"data/heldout/{type_.value}.txt")


@cache
def heldout_captions() -> tuple[str, ...]:
    """Generic captions outside the built-in prior captions (the report's prior drift)."""
    return _lines("data/heldout_captions.txt")


@dataclass(frozen=True)
class PromptPair:
    concept: str  # prompt containing the concept
    anchor: str  # same template filled with the anchor phrase


def prompt_pairs(concept: Concept, n: int | None = None) -> list[PromptPair]:
    """Concept prompts and their anchor twins; the first ``n`` templates (all by default)."""
    ts = templates(concept.type)
    return _pairs(concept, ts if n is None else ts[:n])


def heldout_pairs(concept: Concept) -> list[PromptPair]:
    """Concept/anchor pairs from the held-out templates (never trained on)."""
    return _pairs(concept, heldout_templates(concept.type))


def _pairs(concept: Concept, ts: tuple[str, ...]) -> list[PromptPair]:
    return [PromptPair(t.format(concept.text), t.format(concept.anchor)) for t in ts]


def heldout_prompts(concepts: list[Concept]) -> list[str]:
    """Every held-out template of each concept's type, filled with the concept."""
    return [t.format(c.text) for c in concepts for t in heldout_templates(c.type)]


def concept_prompts(concept: Concept) -> list[str]:
    """Augmented prompts of a concept (training prompts and fusion statistics)."""
    return [p.concept for p in prompt_pairs(concept)]


def generation_prompt(concept: Concept) -> str:
    return GENERATION_PROMPTS[concept.type].format(concept.text)


def domain_prompts(texts: list[str], type_: ConceptType, n: int | None = None) -> list[str]:
    """Prompts of a preserved set: each text in the first ``n`` templates of ``type_``.

    The domain set C_d (the type's domain phrase, "a person") and the retained set C_r
    (the ``--retain`` concepts) are built this way.
    """
    ts = templates(type_)
    ts = ts if n is None else ts[:n]
    return [t.format(x) for x in texts for t in ts]


# Every packaged file a prompt is made from: what a run's result depends on besides the model,
# the concepts and the settings (the built-in prior captions are keyed by their content
# wherever they are used).
PROMPT_FILES: tuple[str, ...] = (
    *(f"templates/{t.value}.txt" for t in ConceptType),
    *(f"heldout/{t.value}.txt" for t in ConceptType),
    "heldout_captions.txt",
)


def prompt_data_digest(root: Traversable | None = None) -> str:
    """Content hash of the prompt files (``PROMPT_FILES`` under ``root``, default the packaged
    ``mace_core/data``) and the generation prompts: part of every run id, so that a run made
    with other templates or held-out prompts is another run, never resumed as this one."""
    if root is None:
        return _packaged_prompt_digest()
    h = hashlib.sha256()
    for rel in PROMPT_FILES:
        data = root.joinpath(rel).read_bytes()
        h.update(f"{rel}\0{len(data)}\0".encode())
        h.update(data)
    h.update(json.dumps({t.value: p for t, p in GENERATION_PROMPTS.items()}, sort_keys=True).encode())
    return h.hexdigest()[:16]


@cache
def _packaged_prompt_digest() -> str:
    """The packaged files, hashed once per process (they cannot change under a running one)."""
    return prompt_data_digest(resources.files("mace_core").joinpath("data"))
