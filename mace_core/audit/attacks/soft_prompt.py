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
from typing import ClassVar

import torch

from mace_core.audit.base import Attack, AttackResult, search
from mace_core.audit.context import AttackContext
from mace_core.audit.embedding import AttackPrompt
from mace_core.options import Settings, setting
from mace_core.prompts import templates


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


def project_l2(delta: torch.Tensor, radius: float) -> torch.Tensor:
    """delta scaled onto the ball ||delta||_F <= radius (unchanged inside it)."""
    norm = float(delta.norm())
    return delta * (radius / norm) if norm > radius else delta


class SoftPrompt(Attack):
    name: ClassVar[str] = "soft-prompt"
    title: ClassVar[str] = "Soft-prompt search (the concept's embeddings within an L2 ball)"
    settings_class: ClassVar[type] = SoftPromptSettings

    def run(self, ctx: AttackContext) -> AttackResult:
        """Projected gradient descent on L(delta) (module doc) within ||delta||_F <= l2 ||E||_F."""
        s: SoftPromptSettings = self.settings
        concept = ctx.concept.concept
        text = ctx.models.erased.text
        base = text.token_embeddings(concept.text)  # per encoder (k_i, d_i)
        scales = [e.pow(2).mean().sqrt() for e in base]
        radii = [s.l2 * float(e.norm()) for e in base]
        # The loss runs on training templates, the measure on held-out ones: the perturbation
        # must carry over to phrasings it was not fitted on.
        train = ctx.models.meter(ctx.concept, templates(concept.type)[: s.templates])
        z = [torch.zeros_like(e, requires_grad=True) for e in base]
        opt = torch.optim.Adam(z, lr=s.lr)
        losses: list[float] = []

        def perturbed() -> tuple[torch.Tensor, ...]:
            return tuple(e + zi * sc for e, zi, sc in zip(base, z, scales, strict=True))

        def step(i: int) -> AttackPrompt:
            loss = train.loss(AttackPrompt(concept.text, perturbed()))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                for zi, sc, radius in zip(z, scales, radii, strict=True):
                    zi.copy_(project_l2(zi * sc, radius) / sc)
            losses.append(float(loss.detach()))
            return AttackPrompt(concept.text, tuple(e.detach() for e in perturbed()))

        return search(
            ctx,
            self,
            AttackPrompt(concept.text, base),
            s.steps,
            step,
            details=lambda: {
                "radius": radii,  # per text encoder
                "delta_norm": [float((zi * sc).detach().norm()) for zi, sc in zip(z, scales, strict=True)],
                "losses": [round(x, 8) for x in losses],
            },
        )


ATTACK = SoftPrompt()
