"""Fixed seeds per prompt image, derived deterministically.

The seed of image ``j`` of a prompt depends only on (base seed, suite, prompt key, j), never
on the shard, the worker or the order of work, so every machine renders the same images.
"""

from __future__ import annotations

import hashlib

SEED_MASK = (1 << 63) - 1


def derived_seed(base: int, suite: str, key: str, index: int) -> int:
    """A 63-bit seed from a SHA-256 of its inputs (stable across Python versions and hosts)."""
    h = hashlib.sha256(f"{base}\0{suite}\0{key}\0{index}".encode()).digest()
    return int.from_bytes(h[:8], "little") & SEED_MASK


def image_seeds(
    base: int,
    suite: str,
    key: str,
    n: int,
    explicit: tuple[int, ...] | None = None,
    first: int | None = None,
) -> list[int]:
    """Seeds of one prompt's images, by precedence.

    ``explicit`` (the ``--seeds`` list): exactly those seeds. ``first`` (a CSV's own seed, e.g.
    I2P ``sd_seed``): ``first, first + 1, ...``, so image 0 is the dataset's published image.
    Otherwise ``n`` seeds derived from (base, suite, key, j).
    """
    if explicit:
        return [int(s) & SEED_MASK for s in explicit]
    if first is not None:
        return [(first + j) & SEED_MASK for j in range(n)]
    return [derived_seed(base, suite, key, j) for j in range(n)]
