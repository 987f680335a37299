"""The erasure report: how far each concept moved, and what else moved, measured cheaply.

All figures use prompts that no training or statistics step saw (the held-out templates
and captions of ``mace_core.prompts``) and compare models through the projections MACE edits
(CFR Eq. 2, fusion Eq. 7; ``mace_core.projections``): attn2 to_k/to_v of SD, context_embedder
and the pooled text projection of FLUX.1 / SD 3.x. A projection's bias is never edited and
cancels in every difference below, so they compare W e alone:

- residual: the share of the squared gap between a concept prompt's keys/values and the
  ORIGINAL model's keys/values of its anchor twin that is left, over the aligned
  (co-existing) positions of Stage 1:
      sum ||W_new e_f - W e_g||^2 / sum ||W e_f - W e_g||^2
  1 for an unchanged model, 0 when the concept's states map exactly onto the anchor's.
  Also on the concept's training prompts (``residual_train``): the gap between the two
  is how well the erasure carries over to phrasings it never saw;
- drift: the relative squared change of the keys/values of other prompts (generic
  captions, retained concepts), all positions:  sum ||(W_new - W) e||^2 / sum ||W e||^2;
- attention mass: the share of cross-attention that queries inside a concept's masks
  give its tokens (every occurrence), at fixed timesteps, for the original and the erased
  UNet: what the attention loss (Eq. 3) lowers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from mace_core.attention_loss import masked_attention_share
from mace_core.concepts import Concept
from mace_core.datagen import images_to_tensor
from mace_core.families.base import PromptEncoder, conditioning_to
from mace_core.lora import LoraFactors
from mace_core.noise import training_schedule
from mace_core.prompts import PromptPair, heldout_pairs, heldout_prompts, heldout_templates
from mace_core.train import concept_seed, concept_token_mask, encode_latents

# Fixed timesteps of the attention-mass probe: across the trajectory, CFIS's focus included.
MASS_TIMESTEPS = (250, 500, 750)


class KVProjection:
    """Every edited projection of one model (statistics weights) stacked into one matrix: one
    product gives all keys and values (an MMDiT's embedded context) of a batch of token
    states (float32, on ``device``)."""

    def __init__(self, weights: dict[str, torch.Tensor], device: torch.device) -> None:
        self.keys = sorted(weights)
        self.W = torch.cat([weights[k].float() for k in self.keys]).to(device)

    def __call__(self, e: torch.Tensor) -> torch.Tensor:
        return e.to(self.W.device, torch.float32) @ self.W.T


def _sq(x: torch.Tensor) -> float:
    return float(x.double().pow(2).sum())


def kv_gaps(
    encoder: PromptEncoder,
    concept: Concept,
    original: KVProjection,
    models: dict[str, KVProjection],
    pairs: Sequence[PromptPair] | None = None,
) -> tuple[float, dict[str, float | None]]:
    """The squared gap of ``concept`` to its anchor under the original model, summed over
    ``pairs`` (default: its held-out pairs), and each model's residual (module doc): None
    when the concept and its anchor give the same states (no gap to close)."""
    pairs = heldout_pairs(concept) if pairs is None else pairs
    ef_all = encoder.encode([p.concept for p in pairs])
    eg_all = encoder.encode([p.anchor for p in pairs])
    gap = 0.0
    left = dict.fromkeys(models, 0.0)
    for pair, ef, eg in zip(pairs, ef_all, eg_all, strict=True):
        al = encoder.align(pair.concept, pair.anchor)
        f = ef[al.concept_positions]
        target = original(eg[al.anchor_positions])
        gap += _sq(original(f) - target)
        for name, model in models.items():
            left[name] += _sq(model(f) - target)
    return gap, {name: (v / gap if gap > 0 else None) for name, v in left.items()}


def kv_drift(
    encoder: PromptEncoder, prompts: Sequence[str], original: KVProjection, new: KVProjection
) -> float | None:
    """Relative squared change of the keys/values of ``prompts`` (all positions); None if empty."""
    if not prompts:
        return None
    change = base = 0.0
    for i in range(0, len(prompts), encoder.batch_size):
        e = encoder.encode(list(prompts[i : i + encoder.batch_size])).reshape(-1, encoder.dim)
        k0 = original(e)
        change += _sq(new(e) - k0)
        base += _sq(k0)
    return change / base if base > 0 else None


def concept_drifts(
    encoder: PromptEncoder, concepts: Sequence[Concept], original: KVProjection, new: KVProjection
) -> dict[str, float | None]:
    """Drift of each concept's held-out prompts, by slug: how much concepts that should be
    kept (retained or bystanders never named in the run) moved."""
    return {c.slug: kv_drift(encoder, heldout_prompts([c]), original, new) for c in concepts}


@torch.no_grad()
def attention_mass(
    unet,
    vae,
    noise_scheduler,
    encoder: PromptEncoder,
    concept: Concept,
    images: np.ndarray,
    masks: np.ndarray,
    models: dict[str, dict[str, torch.Tensor]],
    device: torch.device,
    seed: int = 0,
    n_images: int = 2,
    timesteps: Sequence[int] = MASS_TIMESTEPS,
) -> dict[str, float]:
    """Attention mass of ``concept`` for each model of ``models`` (name -> statistics weights of
    the edited projections, ``mace_core.projections``).

    The concept's first ``n_images`` training images (uint8 N,H,W,3) and masks, each with
    a held-out prompt, noised at every timestep of ``timesteps`` with fixed noise: the
    same inputs for every model, one UNet batch per model.
    """
    n = min(n_images, len(images))
    lat = encode_latents(vae, images_to_tensor(images[:n]), device)
    temps = heldout_templates(concept.type)
    prompts = [temps[i % len(temps)].format(concept.text) for i in range(n)]
    cond = conditioning_to(encoder.conditioning(prompts), device)
    tok = torch.stack([concept_token_mask(encoder, p, concept) for p in prompts]).to(device)
    g = torch.Generator().manual_seed(concept_seed(seed, concept, "report"))
    noise = torch.randn((n * len(timesteps), *lat.shape[1:]), generator=g).to(device)
    idx = torch.arange(n, device=device).repeat_interleave(len(timesteps))
    t = torch.tensor(list(timesteps) * n, device=device)
    schedule = training_schedule(noise_scheduler).to(device)
    x = schedule.noised(lat[idx], t, noise)
    m = torch.from_numpy(np.asarray(masks[:n])).to(device)[idx]
    dtype = next(unet.parameters()).dtype
    batch = {key: v[idx].to(dtype) for key, v in cond.items()}
    projections = encoder.edited_projections(unet)
    out = {}
    for name, weights in models.items():
        with projections.weights_set(weights), encoder.attention_probes(unet) as store:
            encoder.unet_forward(unet, x.to(dtype), schedule.model_time(t), batch)
            out[name] = float(masked_attention_share(store, m, tok[idx], tuple(lat.shape[-2:])).mean())
    return out


def lora_relative_norm(lora: LoraFactors, weights: dict[str, torch.Tensor]) -> float:
    """||dW||_F / ||W||_F over all projections together, dW = B A the concept's LoRA."""
    num = sum(_sq(B.double() @ A.double()) for A, B in lora.factors.values())
    den = sum(_sq(weights[k]) for k in lora.factors)
    return (num / den) ** 0.5 if den > 0 else 0.0


def _stats(values: list[float]) -> dict[str, float] | None:
    return {"mean": sum(values) / len(values), "max": max(values)} if values else None


def _residual_stats(
    per_concept: dict[str, dict[str, Any]], key: str, gap_key: str = "gap"
) -> dict[str, float] | None:
    """Mean and max of the concepts' residuals, and the pooled residual: the share of all
    concepts' squared gap that is left (concepts weighted by their gap ``gap_key``, so one
    whose gap was tiny to begin with cannot dominate)."""
    rows = [(e[key], e[gap_key]) for e in per_concept.values() if e.get(key) is not None]
    out = _stats([r for r, _ in rows])
    if out is None:
        return None
    total = sum(g for _, g in rows)
    return {"pooled": sum(r * g for r, g in rows) / total, **out}


def above_limit(residuals: dict[str, float | None], limit: float | None) -> dict[str, float]:
    """The entries of ``residuals`` (name -> final residual) above ``limit`` (None: none)."""
    if limit is None:
        return {}
    return {name: r for name, r in residuals.items() if r is not None and r > limit}


def summarize(
    per_concept: dict[str, dict[str, Any]], drift: dict[str, Any], max_residual: float | None = None
) -> dict[str, Any]:
    """The run's erasure report: per-concept entries, their mean/max, the drifts, and the
    concepts whose final residual exceeds ``max_residual`` (None: no limit)."""

    def col(key: str) -> list[float]:
        return [e[key] for e in per_concept.values() if e.get(key) is not None]

    masses = [e["attention_mass"] for e in per_concept.values() if e.get("attention_mass")]
    out: dict[str, Any] = {
        "concepts": per_concept,
        "residual_cfr": _residual_stats(per_concept, "residual_cfr"),
        "residual": _residual_stats(per_concept, "residual"),
        "residual_train": _residual_stats(per_concept, "residual_train", "gap_train"),
        **_pooled_stats(per_concept),
        "lora_relative_norm": _stats(col("lora_relative_norm")),
        "attention_mass": {
            name: sum(m[name] for m in masses) / len(masses) for name in ("original", "erased")
        }
        if masses
        else None,
        **drift,
        "mass_timesteps": list(MASS_TIMESTEPS),
        "max_residual": max_residual,
        "above_max_residual": sorted(
            above_limit({slug: e.get("residual") for slug, e in per_concept.items()}, max_residual)
        ),
    }
    if "retain_drift" not in drift:
        out["retain_drift"] = None
        out["retain_drift_missing"] = "no --retain set"
    return out


def _pooled_stats(per_concept: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Mean and max of the pooled text projection's residuals (FLUX.1 / SD 3.x), reported
    beside the context's; nothing for a family without one."""
    out = {}
    for key in ("residual_pooled_cfr", "residual_pooled"):
        values = [e[key] for e in per_concept.values() if e.get(key) is not None]
        if values:
            out[key] = _stats(values)
    return out


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def headline(summary: dict[str, Any]) -> dict[str, Any]:
    """The report's figures without the per-concept entries: what ``mace-ray status`` shows."""
    keys = (
        "residual", "residual_cfr", "residual_train", "prior_drift", "prior_drift_cfr", "retain_drift",
        "retain_drift_cfr", "retain_drift_missing", "lora_relative_norm", "attention_mass", "max_residual",
        "above_max_residual", "residual_pooled", "residual_pooled_cfr", "prior_drift_pooled",
        "prior_drift_pooled_cfr",
    )  # fmt: skip
    return {k: summary[k] for k in keys if k in summary}


def summary_line(summary: dict[str, Any]) -> str:
    """One line of the report for logs and the end of a run."""
    res, cfr = summary.get("residual") or {}, summary.get("residual_cfr") or {}
    train = summary.get("residual_train") or {}
    mass = summary.get("attention_mass") or {}
    parts = [
        f"residual {_fmt(res.get('pooled'))} pooled (mean {_fmt(res.get('mean'))}, "
        f"max {_fmt(res.get('max'))}; after CFR {_fmt(cfr.get('pooled'))}; "
        f"on training prompts {_fmt(train.get('pooled'))})",
        f"prior drift {_fmt(summary.get('prior_drift'), '.4f')}",
        f"retain drift {_fmt(summary.get('retain_drift'), '.4f')}",
    ]
    if mass:
        before, after = _fmt(mass.get("original"), ".4f"), _fmt(mass.get("erased"), ".4f")
        parts.append(f"attention mass {before} -> {after}")
    pooled = summary.get("residual_pooled")
    if pooled:
        parts.append(
            f"pooled projection residual {_fmt(pooled.get('mean'))} mean, "
            f"drift {_fmt(summary.get('prior_drift_pooled'), '.4f')}"
        )
    above = summary.get("above_max_residual") or []
    if above:
        parts.append(f"{len(above)} above --max-residual {summary.get('max_residual')}")
    return ", ".join(parts)
