"""Closed-form fusion of the per-concept LoRAs (MACE Eq. 7).

    W* = [ sum_k (W' + dW_k) C_k + W (f C_p + w C_d + q C_r) + r W' ]
         [ sum_k C_k + f C_p + w C_d + q C_r + r I ]^-1

Per concept only C_k (d x d) and dW_k C_k = B_k (A_k C_k) enter, so the sums stream:
``FusionSums`` adds concepts one at a time, in any order, and two partial sums add.
The LoRA-free part sum_k W' C_k is W' (sum_k C_k), formed once at solve time.

Streaming is blocked: a concept's A_k C_k for all projections is one product (its C_k is
read once), kept with its B_k; every ``block`` concepts, each projection's sum gains
[B_1 .. B_b] [A_1 C_1; ..; A_b C_b] in one GEMM, so the d_out x d sums are swept once per
block instead of once per concept (which bounded the old stream by memory bandwidth).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mace_core.cfr import Preservation, RawWeights, regularise, solve_right
from mace_core.closed_form_weights import Weights
from mace_core.lora import LoraFactors
from mace_core.text_stats import SecondMoment


@dataclass
class FusionSums:
    """Running sums of Eq. 7: S_C = sum_k C_k, S_dW[proj] = sum_k dW_k C_k (float64).

    ``block``: concepts whose low-rank terms wait before one GEMM per projection adds them
    (1: the plain one-at-a-time sum). Reading ``dWC`` through ``flush()`` (as ``fuse``
    does) includes every concept added.
    """

    C: SecondMoment
    dWC: dict[str, torch.Tensor] = field(default_factory=dict)
    concepts: int = 0
    block: int = 256
    # Per waiting concept: its projection keys, B_k per key, and A_k C_k of all keys stacked.
    _pending: list[tuple[list[str], list[torch.Tensor], torch.Tensor]] = field(
        default_factory=list, repr=False, compare=False
    )

    @classmethod
    def zeros(cls, d: int) -> FusionSums:
        return cls(SecondMoment.zeros(d))

    def add_concept(self, C_k: SecondMoment, lora: LoraFactors) -> None:
        """Stream one concept in: C_k now, its dW_k C_k = B_k (A_k C_k) with its block."""
        self.C += C_k  # its rows per block of the token-state space too
        keys = sorted(lora.factors)
        if keys:
            # One product for every projection: C_k is read once per concept.
            AC = torch.cat([lora.factors[k][0].double() for k in keys]) @ C_k.C  # (sum r) x d
            self._pending.append((keys, [lora.factors[k][1].double() for k in keys], AC))
        self.concepts += 1
        if len(self._pending) >= self.block:
            self.flush()

    def flush(self) -> FusionSums:
        """Add the waiting concepts' low-rank terms: per projection, one GEMM
        [B_1 .. B_b] [A_1 C_1; ..; A_b C_b] = sum_k B_k A_k C_k."""
        if not self._pending:
            return self
        Bs: dict[str, list[torch.Tensor]] = {}
        ACs: dict[str, list[torch.Tensor]] = {}
        for keys, B_list, AC in self._pending:
            row = 0
            for key, B in zip(keys, B_list, strict=True):
                r = B.shape[1]
                Bs.setdefault(key, []).append(B)
                ACs.setdefault(key, []).append(AC[row : row + r])
                row += r
        for key in Bs:
            B, AC = torch.cat(Bs[key], dim=1), torch.cat(ACs[key], dim=0)
            if key in self.dWC:
                self.dWC[key].addmm_(B, AC)
            else:
                self.dWC[key] = B @ AC
        self._pending.clear()
        return self


def fuse(
    sums: FusionSums,
    original: dict[str, torch.Tensor],
    refined: dict[str, torch.Tensor],
    weights: Weights,
    terms: Preservation,
) -> tuple[dict[str, torch.Tensor], RawWeights]:
    """Eq. 7 for every projection: W* from the running sums, float64 solve, float32 out.

    ``original`` is W (anchors the preservation terms), ``refined`` is W' (the CFR
    result, on which the LoRAs were trained and which the ridge pulls towards). A ridge
    too small to solve is raised to ``ridge_floor`` and reported, as in CFR. An MMDiT's
    [context | pooled] blocks take their own weights and counts (``regularise``).
    """
    sums.flush()
    R, ridge, raw = regularise(sums.C, weights, terms)
    # Denominator: sum_k C_k + R + r I (shared by all projections).
    D = sums.C.C + R + ridge * torch.eye(sums.C.C.shape[0], dtype=torch.float64)
    numerators = []
    for key, W in original.items():
        W = W.double()
        Wr = refined[key].double()
        N = Wr @ sums.C.C + W @ R + ridge * Wr  # a per-column ridge scales Wr's columns: Wr diag(r)
        if key in sums.dWC:
            N = N + sums.dWC[key]
        numerators.append(N)
    # One solve for every projection (their rows stacked): D is factorised once.
    solved = solve_right(D, torch.cat(numerators)).float()  # W* D = N, D symmetric
    rows = [N.shape[0] for N in numerators]
    # Own storage per matrix: safetensors refuses tensors that share memory.
    return {k: W.clone() for k, W in zip(original, solved.split(rows), strict=True)}, raw
