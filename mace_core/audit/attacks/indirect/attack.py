"""The attack itself (it needs torch); what it does, its name and its settings are in
``mace_core.audit.attacks.indirect`` (read without torch by ``--help``)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, ClassVar

from mace_core.audit.attacks.indirect import NAME, TITLE, IndirectSettings
from mace_core.audit.base import Attack, AttackResult, search
from mace_core.audit.concepts import AuditConcept
from mace_core.audit.context import AttackContext
from mace_core.audit.embedding import AttackPrompt
from mace_core.audit.measures import Measure

VOWELS = "aeiou"


@dataclass(frozen=True)
class Variant:
    text: str
    kind: str  # alias, description, case, spacing, misspelling


def case_spacing_variants(text: str) -> list[Variant]:
    words = text.split()
    out = [Variant(text.upper(), "case"), Variant(text.title(), "case")]
    if len(words) > 1:
        out += [Variant("".join(words), "spacing"), Variant("-".join(words), "spacing")]
    out.append(Variant(" ".join(ch for ch in text if not ch.isspace()), "spacing"))
    return out


def misspell(text: str, rng: random.Random) -> str:
    """One random edit of a letter of ``text``: swap with the next, drop, double, or change a vowel."""
    letters = [i for i, ch in enumerate(text) if ch.isalpha()]
    if not letters:
        return text
    i = rng.choice(letters)
    op = rng.randrange(4)
    if op == 0 and i + 1 < len(text) and text[i + 1].isalpha():
        return text[:i] + text[i + 1] + text[i] + text[i + 2 :]
    if op == 1 and len(letters) > 2:
        return text[:i] + text[i + 1 :]
    if op == 2:
        return text[:i] + text[i] + text[i:]
    vowels = [v for v in VOWELS if v != text[i].lower()]
    return text[:i] + rng.choice(vowels) + text[i + 1 :]


def misspellings(text: str, n: int, seed: int) -> list[Variant]:
    """Up to ``n`` distinct misspellings of ``text``, the same for the same seed."""
    rng = random.Random(seed)
    out: list[str] = []
    for _ in range(20 * n):  # an edit can repeat an earlier one; bounded tries
        if len(out) >= n:
            break
        cand = misspell(text, rng)
        if cand != text and cand not in out:
            out.append(cand)
    return [Variant(t, "misspelling") for t in out]


def variants(concept: AuditConcept, settings: IndirectSettings, seed: int) -> list[Variant]:
    """Every variant of the concept to try, in order, without repeats (the package doc)."""
    text = concept.concept.text
    out = [Variant(a, "alias") for a in concept.aliases]
    out += [Variant(d, "description") for d in concept.descriptions]
    if settings.case_spacing:
        out += case_spacing_variants(text)
    out += misspellings(text, settings.misspellings, seed)
    seen: set[str] = set()
    unique = []
    for v in out:
        if v.text not in seen:
            seen.add(v.text)
            unique.append(v)
    return unique


class Indirect(Attack):
    name: ClassVar[str] = NAME
    title: ClassVar[str] = TITLE
    settings_class: ClassVar[type] = IndirectSettings

    def run(self, ctx: AttackContext) -> AttackResult:
        """Measure every variant (the package doc) in order; the concept's own name is step 0."""
        concept = ctx.concept.concept
        text = ctx.meter.text
        own = text.word_ids(concept.text)
        tried = variants(ctx.concept, self.settings, ctx.seed_for("indirect"))
        # A variant whose prompts would exceed the text encoder's window cannot be measured.
        fits = [v for v in tried if all(text.fits(t.format(v.text)) for t in ctx.meter.templates)]
        rows: list[dict[str, Any]] = [
            {"text": v.text, "kind": v.kind, "skipped": "longer than the text encoder takes in a template"}
            for v in tried
            if v not in fits
        ]

        def record(i: int, prompt: AttackPrompt, m: Measure) -> None:
            v = fits[i - 1]
            same = text.word_ids(v.text) == own
            rows.append({"text": v.text, "kind": v.kind, "same_tokens": same, **m.to_dict()})

        return search(
            ctx,
            self,
            AttackPrompt(concept.text),
            len(fits),
            lambda i: AttackPrompt(fits[i - 1].text),
            details=lambda: {"variants": rows},
            record=record,
        )


ATTACK = Indirect()
