"""The attack itself (it needs torch); what it does, its name and its settings are in
``mace_core.audit.attacks.inversion`` (read without torch by ``--help``)."""

from __future__ import annotations

from typing import ClassVar

import torch

from mace_core.audit.attacks.inversion import NAME, TITLE, InversionSettings, InversionTarget
from mace_core.audit.base import Attack, AttackResult, search
from mace_core.audit.context import AttackContext
from mace_core.audit.embedding import PLACEHOLDER, AttackPrompt
from mace_core.datagen import images_to_tensor
from mace_core.families.base import conditioning_to
from mace_core.noise import DDPMSchedule, NoiseSchedule, training_schedule
from mace_core.prompts import templates
from mace_core.train import encode_latents


def denoising_target(
    prediction: str, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule
) -> torch.Tensor:
    """What the denoiser is trained to predict for x_t = ``schedule.noised(x0, t, noise)``:
    epsilon -> noise; v_prediction -> sqrt(a_t) noise - sqrt(1 - a_t) x0; sample -> x0;
    flow (rectified flow's velocity) -> noise - x0."""
    if prediction == "epsilon":
        return noise
    if prediction == "flow":
        return noise - x0
    if prediction == "sample":
        return x0
    if prediction == "v_prediction" and isinstance(schedule, DDPMSchedule):
        a = schedule.alphas[t].view(-1, *([1] * (x0.ndim - 1)))
        return a.sqrt() * noise - (1 - a).sqrt() * x0
    raise ValueError(f"unknown prediction type {prediction!r}")


class Inversion(Attack):
    name: ClassVar[str] = NAME
    title: ClassVar[str] = TITLE
    settings_class: ClassVar[type] = InversionSettings

    def run(self, ctx: AttackContext) -> AttackResult:
        """Minimise L(v) (the package doc, ``images`` or ``teacher`` target) by Adam on v, one
        batch per step, the best v so far (held-out leak) kept."""
        s: InversionSettings = self.settings
        models, concept = ctx.models, ctx.concept.concept
        erased, original, device = models.erased, models.original, models.device
        if ctx.original_images is None:
            raise ValueError("concept inversion needs the original model's images of the concept")
        images = ctx.original_images(s.images)
        lat = encode_latents(erased.pipe.vae, images_to_tensor(images), device)
        schedule = training_schedule(erased.family.training_schedule(erased.pipe)).to(device)
        prediction = erased.family.prediction_type(erased.pipe)
        denoisers = [side.family.denoiser(side.pipe) for side in (erased, original)]
        dtype = denoisers[0].dtype
        temps = templates(concept.type)
        text = erased.text
        scales = text.embedding_scales()
        # Every encoder's placeholder tokens start at the mean of its anchor tokens.
        k = [len(ids) for ids in text.word_ids(PLACEHOLDER)]
        start = tuple(
            e.mean(0, keepdim=True).expand(n, -1).clone()
            for e, n in zip(text.token_embeddings(concept.anchor), k, strict=True)
        )
        z = [(e / sc).clone().requires_grad_(True) for e, sc in zip(start, scales, strict=True)]
        opt = torch.optim.Adam(z, lr=s.lr)
        g = torch.Generator().manual_seed(ctx.seed_for("inversion"))
        losses: list[float] = []

        def current() -> tuple[torch.Tensor, ...]:
            return tuple(zi * sc for zi, sc in zip(z, scales, strict=True))

        def step(i: int) -> AttackPrompt:
            # Draws in a fixed order from the concept's generator: step i is the same whatever
            # the number of steps, so a longer search repeats a shorter one first.
            idx = torch.randint(len(lat), (s.batch,), generator=g)
            tmp = torch.randint(len(temps), (s.batch,), generator=g).tolist()
            t = torch.randint(0, schedule.num_timesteps, (s.batch,), generator=g).to(device)
            noise = torch.randn((s.batch, *lat.shape[1:]), generator=g).to(device)
            x0 = lat[idx.to(device)]
            x = schedule.noised(x0, t, noise).to(dtype)
            model_t = schedule.model_time(t)  # the time the denoiser is told (flow models: sigma)
            chosen = [temps[j] for j in tmp]
            if s.target == InversionTarget.TEACHER:
                with torch.no_grad():
                    cond = conditioning_to(
                        original.text.conditioning(chosen, AttackPrompt(concept.text)), dtype
                    )
                    target = original.prompts.unet_forward(denoisers[1], x, model_t, cond).sample
            else:
                target = denoising_target(prediction, x0, noise, t, schedule)
            prompt = AttackPrompt(PLACEHOLDER, current())
            cond = conditioning_to(text.conditioning(chosen, prompt, grad=True), dtype)
            pred = erased.prompts.unet_forward(denoisers[0], x, model_t, cond).sample
            loss = (pred.float() - target.float()).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            return AttackPrompt(PLACEHOLDER, tuple(e.detach() for e in current()))

        return search(
            ctx,
            self,
            AttackPrompt(PLACEHOLDER, start),
            s.steps,
            step,
            details=lambda: {
                "images": len(images),
                "prediction_type": prediction,
                "losses": [round(x, 8) for x in losses],
            },
        )


ATTACK = Inversion()
