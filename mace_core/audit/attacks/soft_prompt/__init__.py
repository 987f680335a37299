"""Soft-prompt search: the concept's own words, nudged within an L2 ball.

A white-box adversarial prompt in the spirit of UnlearnDiffAtk and P4D, searched in the
continuous input-embedding space instead of over discrete tokens: in every text encoder of
the family, the input embeddings E (k, d_in) of the concept's k tokens get a perturbation
delta, the same in every template, all found together by projected gradient descent on

    L(delta) = sum_t sum_p || W_e e_x(E + delta)_p - W e_f,p ||^2 / sum_t sum_p || W e_g,p - W e_f,p ||^2

i.e. 1 - leak (``mace_core.audit.measures``) on the first ``templates`` training templates
of the concept's type: the erased model's keys/values of the perturbed prompt pulled back
onto the original model's keys/values of the concept. After every Adam step each
encoder's delta is projected onto its ball ||delta||_F <= l2 * ||E||_F: ``l2`` is relative to
the concept's own embeddings in that encoder, so the budget means the same for every model,
encoder and concept. Adam moves delta in units of the RMS of E. delta = 0 is the plain
prompt (step 0); the best prompt so far on the held-out templates is the attack's. Costs a
forward and backward of the text encoders per step; no denoiser.
"""

from __future__ import annotations

from dataclasses import dataclass

from mace_core.options import Settings, setting

# Its name (in --attacks, as its options' prefix and in the report) and one line for --help.
NAME = "soft-prompt"
TITLE = "Soft-prompt search (the concept's embeddings within an L2 ball)"


@dataclass(frozen=True)
class SoftPromptSettings(Settings):
    steps: int = setting(100, "Soft-prompt search: projected gradient steps.", min=0)
    lr: float = setting(
        0.05, "Soft-prompt search: Adam step, in RMS units of the concept's embeddings.", min=0.0
    )
    l2: float = setting(
        0.5,
        "Soft-prompt search: L2 radius of the perturbation, relative to the concept's embeddings' norm.",
        min=0.0,
    )
    templates: int = setting(8, "Soft-prompt search: training templates the loss is summed over.", min=1)


SETTINGS = SoftPromptSettings  # its options on the command line: --soft-prompt-...
