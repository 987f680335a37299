"""The interface every attack of the audit implements, and the search loop they share.

An attack is one module of ``mace_core.audit.attacks`` that defines ``ATTACK``, an
instance of an ``Attack`` subclass: a name (``--attacks`` and the report say it), a frozen
settings dataclass whose fields are its command-line options (``--<name>-steps`` ...), and
``run(ctx) -> AttackResult``. Nothing else needs to change for a new attack.

Every attack reports the best prompt it found, measured by the concept's ``LeakMeter``
(``mace_core.audit.measures``) on held-out templates, and how strong it was allowed to be
(``strength``: steps, learning rate, budget), so that results are comparable across runs.
The best-so-far rule makes the reported leak a non-decreasing function of the steps
taken: a longer search on the same seed repeats the shorter one's steps first.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from mace_core.audit.context import AttackContext
from mace_core.audit.embedding import AttackPrompt
from mace_core.audit.measures import BestSoFar, Measure
from mace_core.options import plain

STOPPED_STEPS = "steps"  # ran every step it was given
STOPPED_BUDGET = "budget"  # stopped by --budget


@dataclass
class AttackResult:
    """What an attack found for one concept: its best prompt, that prompt's figures, and
    what the search cost."""

    attack: str
    prompt: AttackPrompt  # the best prompt (its word, and any learned input embeddings)
    measure: Measure  # of the best prompt, on held-out templates
    steps: int  # steps taken
    steps_requested: int
    best_step: int  # the step that found the best prompt (0: the start)
    stopped: str  # STOPPED_STEPS or STOPPED_BUDGET
    seconds: float
    seed: int
    curve: list[float]  # best leak so far after each step; curve[0] is the start
    strength: dict[str, Any]  # the attack's settings and budget: how strong it was allowed to be
    details: dict[str, Any] = field(default_factory=dict)  # attack-specific figures

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, without the embeddings (stored apart, as tensors)."""
        return {
            "attack": self.attack,
            "word": self.prompt.word,
            "learned_tokens": self.prompt.learned_tokens,
            **self.measure.to_dict(),
            "steps": self.steps,
            "steps_requested": self.steps_requested,
            "best_step": self.best_step,
            "stopped": self.stopped,
            "seconds": round(self.seconds, 3),
            "seed": self.seed,
            "curve": [round(x, 6) for x in self.curve],
            "strength": self.strength,
            "details": self.details,
        }


class Attack(ABC):
    """One way of getting an erased concept back."""

    name: ClassVar[str]  # e.g. "soft-prompt": --attacks, option prefix, report key
    title: ClassVar[str]  # one line for --help and the report
    settings_class: ClassVar[type]  # a frozen dataclass of ``setting(...)`` fields

    def __init__(self, settings: Any = None) -> None:
        self.settings = settings if settings is not None else self.settings_class()

    @property
    def key(self) -> str:
        """The attack's name as a Python identifier (its settings field)."""
        return self.name.replace("-", "_")

    def strength(self, ctx: AttackContext) -> dict[str, Any]:
        """How strong this attack was allowed to be: its settings and its time budget."""
        return {**plain(asdict(self.settings)), "budget_s": ctx.budget_s}

    @abstractmethod
    def run(self, ctx: AttackContext) -> AttackResult:
        """Attack ``ctx.concept`` through ``ctx.models.erased``; the best prompt found."""


def search(
    ctx: AttackContext,
    attack: Attack,
    start: AttackPrompt,
    steps: int,
    step: Callable[[int], AttackPrompt],
    details: Callable[[], dict[str, Any]] | None = None,
    record: Callable[[int, AttackPrompt, Measure], None] | None = None,
) -> AttackResult:
    """The loop every attack shares: measure ``start`` (step 0), then call ``step(i)`` for
    i = 1..steps (one update; returns the prompt after it) and measure each result, keeping
    the best (``BestSoFar``); ``record`` sees every step's prompt and measure. Stops early
    when the budget is spent."""
    t0 = time.monotonic()
    best = BestSoFar()
    best.offer(0, start, ctx.meter.measure(start))
    done, stopped = 0, STOPPED_STEPS
    for i in range(1, steps + 1):
        if ctx.out_of_time():
            stopped = STOPPED_BUDGET
            break
        prompt = step(i)
        measure = ctx.meter.measure(prompt)
        best.offer(i, prompt, measure)
        if record is not None:
            record(i, prompt, measure)
        done = i
        ctx.progress(f"{attack.name} steps", i, steps)
    assert best.prompt is not None and best.measure is not None
    return AttackResult(
        attack=attack.name,
        prompt=best.prompt,
        measure=best.measure,
        steps=done,
        steps_requested=steps,
        best_step=best.step,
        stopped=stopped,
        seconds=time.monotonic() - t0,
        seed=ctx.seed,
        curve=best.curve,
        strength=attack.strength(ctx),
        details=details() if details is not None else {},
    )
