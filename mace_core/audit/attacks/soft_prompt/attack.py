"""The attack itself (it needs torch); what it does, its name and its settings are in
``mace_core.audit.attacks.soft_prompt`` (read without torch by ``--help``)."""

from __future__ import annotations

from typing import ClassVar

import torch

from mace_core.audit.attacks.soft_prompt import NAME, TITLE, SoftPromptSettings
from mace_core.audit.base import Attack, AttackResult, search
from mace_core.audit.context import AttackContext
from mace_core.audit.embedding import AttackPrompt
from mace_core.prompts import templates


def project_l2(delta: torch.Tensor, radius: float) -> torch.Tensor:
    """delta scaled onto the ball ||delta||_F <= radius (unchanged inside it)."""
    norm = float(delta.norm())
    return delta * (radius / norm) if norm > radius else delta


class SoftPrompt(Attack):
    name: ClassVar[str] = NAME
    title: ClassVar[str] = TITLE
    settings_class: ClassVar[type] = SoftPromptSettings

    def run(self, ctx: AttackContext) -> AttackResult:
        """Projected gradient descent on L(delta) (the package doc) within ||delta||_F <= l2 ||E||_F."""
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
