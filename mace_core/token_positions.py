"""Where a text's tokens sit in a tokenized prompt (the concept's positions of Eq. 3)."""

from __future__ import annotations


def find_subsequences(ids: list[int], sub: list[int]) -> list[int]:
    """Start of every non-overlapping occurrence of ``sub`` in ``ids``, in order."""
    out, i = [], 0
    while sub and i <= len(ids) - len(sub):
        if ids[i : i + len(sub)] == sub:
            out.append(i)
            i += len(sub)
        else:
            i += 1
    return out
