"""Concept inversion (after Pham et al., ICLR 2024): a new word, learned on the erased model.

Textual inversion of one new token v on the ERASED model from the ORIGINAL model's images
of the concept: an erasure that only moved the concept's own words leaves some other input
embedding that the erased denoiser still renders as the concept. v stands for the
placeholder word (``embedding.PLACEHOLDER``) in the concept type's templates, one embedding
per text encoder of the family (SDXL's two CLIPs, FLUX.1's CLIP and T5, ...: all learned
together), and is trained with the denoising loss, denoiser and text encoders frozen. Per
step, a batch of (image x0, template, timestep t ~ U[0, T), noise n) drawn from the
concept's own generator, x_t the family's noising of x0 at t (``mace_core.noise``: DDPM
sqrt(a_t) x0 + sqrt(1 - a_t) n for SD's UNets, (1 - s_t) x0 + s_t n for the flow models),
and

    images  (Pham et al.):  L(v) = || u_e(x_t, t, c(v)) - target(x0, n, t) ||^2
    teacher (default):      L(v) = || u_e(x_t, t, c(v)) - u_o(x_t, t, c(concept prompt)) ||^2

with u_e / u_o the erased / original denoiser, c(.) the family's conditioning and target
the model's own prediction type (the noise n for epsilon, sqrt(a_t) n - sqrt(1 - a_t) x0
for v-prediction, n - x0 for a rectified flow). On a trained model the original's
prediction for its own images is close to the Bayes-optimal denoiser, so both losses share
their minimiser; the teacher's has no sampling noise, converges in far fewer steps, and is
the only one with a minimiser at the concept on random weights (the tiny model).
``images`` keeps the published attack.

v starts, in every encoder, at the mean input embedding of the anchor's tokens (where the
erasure sent the concept) and moves by Adam in units of the RMS of that encoder's
vocabulary embeddings (so ``lr`` means the same for every model). Each step is measured on
held-out templates; the best v so far is the attack's prompt. The images come from the
erase run when it stored them (made by the original model), else the original model makes
``images`` of them.
"""

from __future__ import annotations

from dataclasses import dataclass

from mace_core.options import Choice, Settings, coerce_choices, setting

# Its name (in --attacks, as its options' prefix and in the report) and one line for --help.
NAME = "inversion"
TITLE = "Concept inversion (one new token learned on the erased model)"


class InversionTarget(Choice):
    TEACHER = "teacher"  # the original model's prediction for the concept prompt
    IMAGES = "images"  # the standard denoising target of the sampled noise (Pham et al.)


@dataclass(frozen=True)
class InversionSettings(Settings):
    steps: int = setting(300, "Concept inversion: optimisation steps.", min=0)
    lr: float = setting(0.2, "Concept inversion: Adam step, in RMS units of the token embeddings.", min=0.0)
    batch: int = setting(2, "Concept inversion: noised images per step.", min=1)
    images: int = setting(
        8, "Concept inversion: images the original model makes when the erase run stored none.", min=1
    )
    target: InversionTarget = setting(
        InversionTarget.TEACHER,
        "Concept inversion: teacher (the original model's prediction for the concept prompt) or "
        "images (the sampled noise: Pham et al.'s loss).",
    )

    def __post_init__(self) -> None:
        coerce_choices(self, {"target": (InversionTarget, "inversion target")})  # a clearer name
        super().__post_init__()


SETTINGS = InversionSettings  # its options on the command line: --inversion-...
