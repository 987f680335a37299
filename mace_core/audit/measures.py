"""How much of an erased concept an attack gets back, read off the edited projections' outputs.

MACE (like most erasure methods) edits the cross-attention to_k / to_v projections (an
MMDiT's context and pooled projections) so that a concept's token states give the keys and
values its anchor's give. An attack succeeds mechanistically when, through the ERASED
model, its prompt gives the keys and values the ORIGINAL model gave the concept. Over the
held-out templates t of the concept's type (``mace_core.prompts.heldout_templates``, never
trained on) and the token positions that carry the concept (the aligned positions of MACE
Stage 1: shared prefix, suffix with end-of-text, padding; ``mace_core.alignment``):

    T = W e_f        the original model's keys/values of the concept prompt
    A = W e_g        the original model's keys/values of its anchor twin
    X = W_e e_x      the erased model's keys/values of the attack's prompt

    leak     = 1 - sum ||X - T||^2 / sum ||A - T||^2,   clipped to [0, 1]
    residual =     sum ||X - A||^2 / sum ||A - T||^2

with W every edited projection of a model stacked (``erasure_report.KVProjection``).
``leak`` is 1 when the attack restores the concept's keys/values exactly (an unerased
model given the concept itself), 0 when it gets no closer to them than the anchor is
(what the erasure aims for) or is farther still. ``residual`` is the erasure report's
residual with the attack's prompt in place of the concept's: 1 for an unchanged model
and the concept itself, 0 on the anchor. Positions pair up by the family's alignment
(``PromptEncoder.align``) of the concept prompt with the anchor prompt and with the attack's
prompt; only positions present in both pairings count, in the numerator and the denominator
alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mace_core.audit.embedding import AttackPrompt, TokenEncoder
from mace_core.concepts import Concept
from mace_core.erasure_report import KVProjection
from mace_core.errors import quoted
from mace_core.prompts import heldout_templates


@dataclass(frozen=True)
class Measure:
    """One prompt's figures: ``leak`` and ``residual`` (module doc) and the gap they divide by."""

    leak: float
    residual: float
    gap: float

    def to_dict(self) -> dict[str, float]:
        return {"leak": self.leak, "residual": self.residual, "gap": self.gap}


def leak_value(num: float, gap: float) -> float:
    """leak = 1 - num / gap clipped to [0, 1] (module doc); 0 when there is no gap to recover."""
    if gap <= 0:
        return 0.0
    return min(1.0, max(0.0, 1.0 - num / gap))


@dataclass
class _Template:
    text: str
    concept_pos: list[int]  # aligned with the anchor prompt
    target: torch.Tensor  # T: (P, out) keys/values of the concept prompt at concept_pos, original model
    anchor: torch.Tensor  # A: (P, out) keys/values of the anchor prompt at its aligned positions


@dataclass
class _Bound:
    """One template's pairing with a given attack word: rows of T/A, positions of the attack prompt."""

    rows: torch.Tensor
    positions: torch.Tensor
    gap: float


class LeakMeter:
    """The leak and residual of attack prompts for one concept (module doc).

    Built once per concept: the original model's keys/values of the concept and anchor
    prompts are computed here; ``measure`` / ``loss`` then run only the erased model.
    """

    def __init__(
        self,
        concept: Concept,
        original_text: TokenEncoder,
        original_kv: KVProjection,
        erased_text: TokenEncoder,
        erased_kv: KVProjection,
        templates: Sequence[str] | None = None,
    ) -> None:
        self.concept = concept
        self.text = erased_text
        self.kv = erased_kv
        self.templates = tuple(templates if templates is not None else heldout_templates(concept.type))
        self.parts: list[_Template] = []
        encoder = original_text.prompts  # the family's: its length limits and alignment
        for t in self.templates:
            for x in (concept.text, concept.anchor):
                encoder.check_length(t.format(x), f"concept {quoted(concept.text)}: a held-out prompt")
        ef = original_text.encode(self.templates, AttackPrompt(concept.text))
        eg = original_text.encode(self.templates, AttackPrompt(concept.anchor))
        with torch.no_grad():
            for t, f, g in zip(self.templates, ef, eg, strict=True):
                al = encoder.align(t.format(concept.text), t.format(concept.anchor))
                self.parts.append(
                    _Template(
                        t, al.concept_positions, original_kv(f[al.concept_positions]),
                        original_kv(g[al.anchor_positions]),
                    )
                )  # fmt: skip
        self._bound: dict[str, list[_Bound]] = {}

    @property
    def gap(self) -> float:
        """sum ||A - T||^2 over every aligned position: the erasure report's gap of the concept."""
        return sum(float((p.anchor - p.target).double().pow(2).sum()) for p in self.parts)

    def _bind(self, word: str) -> list[_Bound]:
        """Pair each template's concept positions with the positions of ``word``'s prompt."""
        if word not in self._bound:
            out = []
            for p in self.parts:
                al = self.text.prompts.align(p.text.format(self.concept.text), p.text.format(word))
                to_x = dict(zip(al.concept_positions, al.anchor_positions, strict=True))
                rows = [i for i, f in enumerate(p.concept_pos) if f in to_x]
                xs = [to_x[p.concept_pos[i]] for i in rows]
                idx = torch.tensor(rows, dtype=torch.long, device=p.target.device)
                gap = float((p.anchor[idx] - p.target[idx]).double().pow(2).sum())
                out.append(_Bound(idx, torch.tensor(xs, dtype=torch.long), gap))
            self._bound[word] = out
        return self._bound[word]

    def _sums(self, prompt: AttackPrompt, grad: bool) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(sum ||X - T||^2, sum ||X - A||^2, gap) of ``prompt`` over the templates."""
        bound = self._bind(prompt.word)
        states = self.text.encode(self.templates, prompt, grad=grad)
        # Reported sums in float64 (of float32 differences, as the gap is); the loss in float32.
        dtype = torch.float32 if grad else torch.float64
        to_t = to_a = torch.zeros((), device=self.kv.W.device, dtype=dtype)
        for p, b, e in zip(self.parts, bound, states, strict=True):
            x = self.kv(e[b.positions.to(e.device)])
            to_t = to_t + (x - p.target[b.rows]).to(dtype).pow(2).sum()
            to_a = to_a + (x - p.anchor[b.rows]).to(dtype).pow(2).sum()
        return to_t, to_a, sum(b.gap for b in bound)

    def loss(self, prompt: AttackPrompt) -> torch.Tensor:
        """sum ||X - T||^2 / gap, differentiable in ``prompt.embeddings``: 1 - leak before clipping."""
        to_t, _, gap = self._sums(prompt, grad=True)
        return to_t / max(gap, 1e-30)

    @torch.no_grad()
    def measure(self, prompt: AttackPrompt) -> Measure:
        """``prompt``'s leak and residual through the erased model (module doc)."""
        to_t, to_a, gap = self._sums(prompt, grad=False)
        num, res = float(to_t.double()), float(to_a.double())
        return Measure(leak_value(num, gap), res / gap if gap > 0 else 0.0, gap)


class BestSoFar:
    """The attacker's best prompt over the steps taken: the reported leak never falls as
    steps are added (a longer run on the same seed repeats the shorter one's steps first)."""

    def __init__(self) -> None:
        self.prompt: AttackPrompt | None = None
        self.measure: Measure | None = None
        self.step = -1
        self.curve: list[float] = []  # the best leak after each step (step 0: the start)

    def offer(self, step: int, prompt: AttackPrompt, measure: Measure) -> None:
        if self.measure is None or measure.leak > self.measure.leak:
            self.prompt, self.measure, self.step = prompt.detached(), measure, step
        self.curve.append(self.measure.leak)
