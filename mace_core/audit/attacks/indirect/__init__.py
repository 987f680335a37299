"""Indirect prompts: the concept named some other way.

An erasure trained on one spelling of a name may leave its aliases, translations,
descriptions, misspellings and odd casings or spacings alone (the text encoder can still
map them near the concept). Per concept this attack tries, in order:

- the aliases and descriptions of the audit concept file (``mace_core.audit.concepts``);
- case and spacing changes: UPPER CASE, Title Case, the words run together, hyphenated,
  the letters spaced out (CLIP's tokenizer lowercases, so case changes often give the
  concept's own tokens: the report says which variants did);
- ``misspellings`` seeded misspellings: two neighbouring letters swapped, a letter dropped
  or doubled, a vowel replaced.

Each variant is one step: its prompt fills every held-out template and is measured through
the erased model; the best variant is the attack's prompt. No gradients, no images needed.
"""

from __future__ import annotations

from dataclasses import dataclass

from mace_core.options import Settings, setting

# Its name (in --attacks, as its options' prefix and in the report) and one line for --help.
NAME = "indirect"
TITLE = "Indirect prompts (aliases, descriptions, misspellings, case and spacing)"


@dataclass(frozen=True)
class IndirectSettings(Settings):
    misspellings: int = setting(3, "Indirect prompts: seeded misspellings tried per concept.", min=0)
    case_spacing: bool = setting(True, "Indirect prompts: try case and spacing changes of the concept.")


SETTINGS = IndirectSettings  # its options on the command line: --indirect-...
