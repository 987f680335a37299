"""The statistics actor of an erase run (``StatsWorker``), a plain class: it holds the running
sums and solves CFR (Eq. 2) and the fusion (Eq. 7) through mace_core. Its state is a cache
of storage, so it can be restarted at any time. The local executor instantiates it
directly; the Ray executor runs it as an actor.
"""

from __future__ import annotations

import json
import logging
import warnings
from typing import Any

import torch

from mace_core.cfr import Preservation, apply_cfr, cfr_matrix
from mace_core.closed_form_weights import PAPER_WEIGHTS, solve_weights
from mace_core.errors import ArtefactError
from mace_core.fusion import FusionSums, fuse
from mace_core.sealed import open_sealed, sealed_bytes
from mace_core.text_stats import (
    POOLED,
    MappingStats,
    SecondMoment,
    second_moment_from_bytes,
)
from mace_ray.erase import artefacts
from mace_ray.erase.layout import prior_cache_path
from mace_ray.erase.spec import RunSpec
from mace_ray.storage.open_store import open_output

log = logging.getLogger("mace_ray")


class StatsWorker:
    """Sums and solves. Its state is a cache of storage: after a restart it rebuilds it."""

    def __init__(self, spec: RunSpec) -> None:
        self.spec = spec
        self.storage = open_output(spec)
        self.layout = spec.layout
        self.sums: FusionSums | None = None
        self.added: set[str] = set()
        if spec.metrics == "ray":
            import ray

            with warnings.catch_warnings():  # Ray's property reads Ray's own deprecated actor_id
                warnings.simplefilter("ignore", DeprecationWarning)
                restarted = ray.get_runtime_context().was_current_actor_reconstructed
            if restarted:
                # Ray restarted this actor after a crash (at most STATS_MAX_RESTARTS times).
                log.warning("statistics actor restarted after a crash; its sums rebuild from storage")

    def _second_moment(self, key: str) -> SecondMoment | None:
        if not self.storage.exists(key):
            return None
        return second_moment_from_bytes(self.storage.read_bytes(key), f"{self.storage.url}/{key}")

    def _preservation(self) -> Preservation:
        prior = self._second_moment(prior_cache_path(self.spec.prior_key))
        if prior is None:
            raise ArtefactError(f"prior statistics {prior_cache_path(self.spec.prior_key)} are missing")
        return Preservation(
            prior=prior,
            domain=self._second_moment(self.layout.domain_stats),
            retain=self._second_moment(self.layout.retain_stats),
        )

    def solve_cfr(self, slugs: list[str]) -> tuple[torch.Tensor | None, list[str]]:
        """Sum every concept's X_k, C_k from storage and solve M (Eq. 2); writes cfr/M.

        Returns (M, []) or, when some concepts' statistics are damaged (they do not match
        their checksums), (None, those slugs) for the driver to compute them again.
        """
        total: MappingStats | None = None
        damaged = []
        for slug in slugs:
            try:
                m = artefacts.read_text_stats(self.storage, self.layout, slug).mapping
            except ArtefactError as e:
                log.warning("%s", str(e)[:300])
                damaged.append(slug)
                continue
            total = m if total is None else total + m
        if damaged:
            return None, damaged
        if total is None:
            raise ArtefactError("CFR needs at least one concept")
        terms = self._preservation()
        settings = self.spec.settings
        weights = solve_weights(
            settings.cfr,
            self.spec.profile,
            len(slugs),
            total,
            terms.domain,
            scale_squared=settings.cfr_scale_squared,
        )
        M, raw = cfr_matrix(total, weights, terms)
        info = {"tokens": total.n, "weights": weights.to_dict(), "raw_weights": raw.to_dict()}
        if total.pooled is not None:
            info["tokens_pooled"] = total.rows(POOLED)
        self.storage.write_bytes(
            self.layout.cfr_matrix, sealed_bytes({"M": M.contiguous()}, {"info": json.dumps(info)})
        )
        return M, []

    def _load_M(self) -> tuple[torch.Tensor, dict[str, Any]]:
        key = self.layout.cfr_matrix
        t, meta = open_sealed(self.storage.read_bytes(key), f"{self.storage.url}/{key}")
        return t["M"].double(), json.loads(meta.get("info", "{}"))

    def add_concepts(self, slugs: list[str]) -> int:
        """Stream finished concepts into the fusion sums (idempotent per slug)."""
        for slug in slugs:
            if slug in self.added:
                continue
            C_k = artefacts.read_text_stats(self.storage, self.layout, slug).fusion
            lora = artefacts.read_lora(self.storage, self.layout, slug)
            if self.sums is None:
                self.sums = FusionSums.zeros(C_k.C.shape[0])
            self.sums.add_concept(C_k, lora)
            self.added.add(slug)
        return len(self.added)

    def fuse(
        self, slugs: list[str], original: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """W* for every projection (Eq. 7), after adding any concept not yet streamed in.

        Returns the weights and, for the report, token counts and raw weights of both solves.
        """
        self.add_concepts(slugs)
        if self.sums is None or set(slugs) != self.added:
            raise ArtefactError("fusion sums do not match the run's concepts")
        M, cfr_info = self._load_M()
        refined = apply_cfr(original, M)
        terms = self._preservation()
        settings = self.spec.settings
        weights = solve_weights(settings.fusion, self.spec.profile, len(slugs), self.sums.C, terms.domain)
        fused, raw = fuse(self.sums, original, refined, weights, terms)
        info = self._info(len(slugs), cfr_info, terms)
        info["tokens"]["fusion"] = self.sums.C.n
        if "pooled" in info["tokens"]:
            info["tokens"]["pooled"]["fusion"] = self.sums.C.rows(POOLED)
        info["weights"]["fusion"] = weights.to_dict()
        info["raw_weights"]["fusion"] = raw.to_dict()
        return fused, info

    def refined(
        self, n_concepts: int, original: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], dict]:
        """W' = W M (Eq. 2) for every projection: the result of a closed-form-only run."""
        M, cfr_info = self._load_M()
        return apply_cfr(original, M), self._info(n_concepts, cfr_info, self._preservation())

    def _info(self, n_concepts: int, cfr_info: dict[str, Any], terms: Preservation) -> dict[str, Any]:
        """For the report: token counts, weights (per-token and raw) and where they come from;
        with a pooled block, its rows of each count (``tokens.pooled``) and its weights
        (``weights.*.pooled``)."""
        settings = self.spec.settings
        stages = [("cfr", settings.cfr)] + (
            [("fusion", settings.fusion)] if self.spec.method == "mace" else []
        )
        tokens: dict[str, Any] = {"cfr_pairs": cfr_info["tokens"], **terms.tokens()}
        if cfr_info.get("tokens_pooled") is not None:
            tokens["pooled"] = {"cfr_pairs": cfr_info["tokens_pooled"], **terms.tokens(POOLED)}
        return {
            "tokens": tokens,
            "weights": {"cfr": cfr_info.get("weights")},
            "raw_weights": {"cfr": cfr_info["raw_weights"]},
            "weights_profile": {
                "type": self.spec.profile.value,
                "concepts": n_concepts,
                "source": PAPER_WEIGHTS[self.spec.profile].source,
                "cfr_scale_squared": settings.cfr_scale_squared,
                "paper_defaults": sorted(
                    f"{stage}.{name}"
                    for stage, cf in stages
                    for name in ("prior_weight", "domain_weight", "ridge")
                    if getattr(cf, name) is None
                ),
            },
        }
