"""Prompt templates per concept type and the concept/anchor prompt pairs (MACE Stage 0).

Templates are our own (``mace_core/data/templates/<type>.txt``, one per line, ``{}``
marks the concept). Each concept prompt has a twin in which the concept is replaced by
its anchor; CFR maps the first onto the second.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources

from mace_core.concepts import Concept, ConceptType

# Stage 2 data generation prompts (MACE.md): one fixed prompt per type.
GENERATION_PROMPTS: dict[ConceptType, str] = {
    ConceptType.OBJECT: "a photo of the {}",
    ConceptType.CELEBRITY: "a photo of {}",
    ConceptType.STYLE: "a painting in the style of {}",
    ConceptType.EXPLICIT: "a photo of {}",
}


@cache
def templates(type_: ConceptType) -> tuple[str, ...]:
    """The prompt templates of a concept type, in file order."""
    text = resources.files("mace_core").joinpath(f"data/templates/{type_.value}.txt").read_text("utf-8")
    out = tuple(line.strip() for line in text.splitlines() if line.strip())
    bad = [t for t in out if t.count("{}") != 1]
    if bad:  # a packaging error, not a user error
        raise RuntimeError(f"template file for {type_.value} has lines without exactly one '{{}}': {bad[:3]}")
    return out


@dataclass(frozen=True)
class PromptPair:
    concept: str  # prompt containing the concept
    anchor: str  # same template filled with the anchor phrase


def prompt_pairs(concept: Concept, n: int | None = None) -> list[PromptPair]:
    """Concept prompts and their anchor twins; the first ``n`` templates (all by default)."""
    ts = templates(concept.type)
    ts = ts if n is None else ts[:n]
    return [PromptPair(t.format(concept.text), t.format(concept.anchor)) for t in ts]


def concept_prompts(concept: Concept) -> list[str]:
    """Augmented prompts of a concept (training prompts and fusion statistics)."""
    return [p.concept for p in prompt_pairs(concept)]


def generation_prompt(concept: Concept) -> str:
    return GENERATION_PROMPTS[concept.type].format(concept.text)


def domain_prompts(texts: list[str], type_: ConceptType) -> list[str]:
    """Prompts of a retained domain set (e.g. celebrities to keep) for the C_d statistics."""
    return [t.format(x) for x in texts for t in templates(type_)]
