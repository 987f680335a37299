"""Token alignment of a concept prompt with its anchor twin (MACE Stage 1, before Eq. 1).

The text encoder is causal, so every token after the concept (and the end-of-text and
padding positions) carries the concept. CFR pairs each such position of the concept
prompt with the position of the anchor prompt that plays the same role: the shared
prefix, the shared suffix (which ends with end-of-text) and then the padding positions
in order. The concept's own tokens have no partner and are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Alignment:
    concept_positions: list[int]  # indices into the padded concept prompt
    anchor_positions: list[int]  # same length: the partner positions in the anchor prompt
    concept_tokens: list[int]  # positions of the concept's own tokens (dropped from the pairs)


def align_tokens(concept_ids: list[int], anchor_ids: list[int], max_length: int) -> Alignment:
    """Align two *unpadded* token id lists (with start and end tokens) over ``max_length`` slots.

    Prefix and suffix are the longest common ones, never overlapping inside either
    prompt; positions ``len(ids) .. max_length-1`` are padding and pair up in order.
    """
    nf, ng = len(concept_ids), len(anchor_ids)
    if nf > max_length or ng > max_length:
        raise ValueError(f"prompt of {max(nf, ng)} tokens exceeds the limit of {max_length}")
    limit = min(nf, ng)
    p = 0
    while p < limit and concept_ids[p] == anchor_ids[p]:
        p += 1
    s = 0
    while s < limit - p and concept_ids[nf - 1 - s] == anchor_ids[ng - 1 - s]:
        s += 1
    f_pos = list(range(p)) + list(range(nf - s, nf))
    g_pos = list(range(p)) + list(range(ng - s, ng))
    n_pad = max_length - max(nf, ng)
    f_pos += list(range(nf, nf + n_pad))
    g_pos += list(range(ng, ng + n_pad))
    return Alignment(f_pos, g_pos, list(range(p, nf - s)))
