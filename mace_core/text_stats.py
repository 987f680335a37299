"""Text-encoder statistics: CFR sums X, C (Eq. 1-2), fusion sums C_k (Eq. 7), prior C_p.

Every statistic is a sum of outer products of the token states of the UNet's
cross-attention context (a family's ``PromptEncoder.encode``: the final text-encoder
states for SD 1.x / 2.x), accumulated in float64, together with its token count. They
are additive: the statistics of many concepts are the sum of the statistics of each.

Statistics layout. An MMDiT's token-state space is [context | pooled] (``mace_core.projections``):
a context row lives in the first columns, a prompt's pooled row in the last ``pooled_width``;
every row lies in one block, so every statistic is block-diagonal. A statistic records how many of
its rows are pooled rows (``PooledBlock``), because the closed forms convert their weights with
each block's own counts (``mace_core.closed_form_weights``). SD's space is all context: no
pooled block (``pooled`` is None), and its statistics are stored exactly as before.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mace_core import version
from mace_core.concepts import Concept
from mace_core.errors import ArtefactError, ConceptError, quoted
from mace_core.families.base import TEXT_DTYPE, PromptEncoder

# SD 1.x / 2.x's PromptEncoder, still importable from here for mace_ray (new code gets a
# model's encoder from its family: mace_core.families).
from mace_core.families.stable_diffusion import TextEncoder as TextEncoder
from mace_core.prompts import PromptPair, concept_prompts, prompt_pairs
from mace_core.sealed import open_sealed, sealed_bytes

# The blocks of the token-state space, in column order (``mace_core.projections``).
CONTEXT, POOLED = "context", "pooled"
BLOCKS = (CONTEXT, POOLED)


@dataclass(frozen=True)
class PooledBlock:
    """The pooled block of a statistic's token-state space: its last ``width`` columns, and how
    many of the statistic's rows lie there (one per prompt, or per aligned pair)."""

    width: int
    rows: int


def pooled_rows(e: torch.Tensor, width: int) -> PooledBlock | None:
    """The pooled block of the rows ``e`` (n x d) whose last ``width`` columns are the pooled
    block (None for ``width`` 0: no pooled block). A row is a pooled row when it is nonzero
    there; a row nonzero in both blocks breaks the layout every closed form relies on."""
    if not width:
        return None
    in_pooled = e[:, -width:].ne(0).any(dim=1)
    if bool(e[in_pooled, :-width].ne(0).any()):  # a bug of the family's encoder, not bad input
        raise RuntimeError(
            "a token state has context and pooled entries: the statistics are not block-diagonal"
        )
    return PooledBlock(width, int(in_pooled.sum()))


class Blocked:
    """Rows and columns per block of a statistic with ``C`` (d x d), ``n`` rows, ``pooled``."""

    C: torch.Tensor
    n: int
    pooled: PooledBlock | None

    def blocks(self) -> tuple[str, ...]:
        """The blocks of its space: (context,) or (context, pooled)."""
        return BLOCKS if self.pooled is not None else (CONTEXT,)

    def rows(self, block: str) -> int:
        """Its rows in ``block`` (N_f, N_p, N_d ... of that block)."""
        pooled = self.pooled.rows if self.pooled is not None else 0
        return pooled if block == POOLED else self.n - pooled

    def columns(self, block: str) -> slice:
        """``block``'s columns of the token-state space."""
        d = self.C.shape[0]
        start = d - (self.pooled.width if self.pooled is not None else 0)
        return slice(start, d) if block == POOLED else slice(0, start)

    def joined(self, other: Blocked) -> PooledBlock | None:
        """The pooled block of the sum of this statistic and ``other`` (an empty statistic
        takes the layout of what is added to it)."""
        a, b = self.pooled, other.pooled
        if a is None and self.n == 0:
            return b
        if b is None and other.n == 0:
            return a
        if a is None and b is None:
            return None
        if a is None or b is None or a.width != b.width:
            raise ArtefactError(f"statistics of two token-state layouts cannot be added ({a} and {b})")
        return PooledBlock(a.width, a.rows + b.rows)


@dataclass
class SecondMoment(Blocked):
    """C = sum e e^T over n token states (float64), ``pooled`` of them pooled rows. Additive."""

    C: torch.Tensor
    n: int
    pooled: PooledBlock | None = None

    @classmethod
    def zeros(cls, d: int) -> SecondMoment:
        return cls(torch.zeros(d, d, dtype=torch.float64), 0)

    @classmethod
    def of(cls, states: torch.Tensor, pooled_width: int = 0) -> SecondMoment:
        """Of token states (..., d); the last ``pooled_width`` columns are the pooled block."""
        e = states.reshape(-1, states.shape[-1]).double()
        return cls(e.T @ e, e.shape[0], pooled_rows(e, pooled_width))

    def __add__(self, other: SecondMoment) -> SecondMoment:
        return SecondMoment(self.C + other.C, self.n + other.n, self.joined(other))

    def __iadd__(self, other: SecondMoment) -> SecondMoment:
        self.pooled = self.joined(other)
        self.C += other.C
        self.n += other.n
        return self

    def mean(self) -> torch.Tensor:
        return self.C / max(self.n, 1)


@dataclass
class MappingStats(Blocked):
    """CFR statistics of Eq. 1: X = sum e_g e_f^T, C = sum e_f e_f^T over n aligned pairs
    (``pooled`` of them pairs of pooled rows)."""

    X: torch.Tensor
    C: torch.Tensor
    n: int
    pooled: PooledBlock | None = None

    @classmethod
    def zeros(cls, d: int) -> MappingStats:
        z = torch.zeros(d, d, dtype=torch.float64)
        return cls(z, z.clone(), 0)

    def __add__(self, other: MappingStats) -> MappingStats:
        return MappingStats(self.X + other.X, self.C + other.C, self.n + other.n, self.joined(other))

    def __iadd__(self, other: MappingStats) -> MappingStats:
        self.pooled = self.joined(other)
        self.X += other.X
        self.C += other.C
        self.n += other.n
        return self


def mapping_stats(encoder: PromptEncoder, pairs: list[PromptPair]) -> MappingStats:
    """X_k, C_k of one concept from its aligned (e_f, e_g) pairs (Eq. 1 sufficient statistics)."""
    ef_all = encoder.encode([p.concept for p in pairs])
    eg_all = encoder.encode([p.anchor for p in pairs])
    stats = MappingStats.zeros(encoder.dim)
    for pair, ef, eg in zip(pairs, ef_all, eg_all, strict=True):
        al = encoder.align(pair.concept, pair.anchor)  # by position, per the family's token layout
        f = ef[al.concept_positions].double()
        g = eg[al.anchor_positions].double()
        # An aligned pair stays in one block (the pooled row pairs with the pooled row), so
        # counting the concept side's pooled rows counts the pooled pairs.
        stats += MappingStats(g.T @ f, f.T @ f, f.shape[0], pooled_rows(f, encoder.pooled_width))
    return stats


@dataclass
class ConceptTextStats:
    """Everything the closed forms need from one concept's prompts."""

    mapping: MappingStats  # CFR, Eq. 1-2
    fusion: SecondMoment  # C_k of Eq. 7: all token states of its augmented prompts

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The statistics as tensors; a pooled block adds its width and rows (SD's: as before)."""
        return {
            "cfr.X": self.mapping.X,
            "cfr.C": self.mapping.C,
            "cfr.n": torch.tensor(self.mapping.n, dtype=torch.int64),
            "fusion.C": self.fusion.C,
            "fusion.n": torch.tensor(self.fusion.n, dtype=torch.int64),
            **pooled_tensors("cfr.", self.mapping.pooled),
            **pooled_tensors("fusion.", self.fusion.pooled),
        }

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> ConceptTextStats:
        try:
            return cls(
                MappingStats(
                    t["cfr.X"].double(), t["cfr.C"].double(), int(t["cfr.n"]), pooled_from(t, "cfr.")
                ),
                SecondMoment(t["fusion.C"].double(), int(t["fusion.n"]), pooled_from(t, "fusion.")),
            )
        except KeyError as e:
            raise ArtefactError(f"concept statistics lack {e}") from None


def pooled_tensors(prefix: str, pooled: PooledBlock | None) -> dict[str, torch.Tensor]:
    """``pooled`` as ``<prefix>pooled_width`` and ``<prefix>pooled_rows`` (nothing for None)."""
    if pooled is None:
        return {}
    return {
        f"{prefix}pooled_width": torch.tensor(pooled.width, dtype=torch.int64),
        f"{prefix}pooled_rows": torch.tensor(pooled.rows, dtype=torch.int64),
    }


def pooled_from(t: dict[str, torch.Tensor], prefix: str) -> PooledBlock | None:
    """The pooled block that ``pooled_tensors`` wrote (None when there is none)."""
    if f"{prefix}pooled_width" not in t:
        return None
    return PooledBlock(int(t[f"{prefix}pooled_width"]), int(t[f"{prefix}pooled_rows"]))


def concept_text_stats(
    encoder: PromptEncoder, concept: Concept, n_prompts: int | None = None
) -> ConceptTextStats:
    """CFR and fusion statistics of one concept."""
    pairs = prompt_pairs(concept, n_prompts)
    for p in pairs:
        encoder.check_length(p.concept, f"concept {quoted(concept.text)}")
        encoder.check_length(p.anchor, f"anchor {quoted(concept.anchor)} of concept {quoted(concept.text)}")
    fusion = SecondMoment.of(encoder.encode(concept_prompts(concept)[: len(pairs)]), encoder.pooled_width)
    return ConceptTextStats(mapping_stats(encoder, pairs), fusion)


def prompt_second_moment(encoder: PromptEncoder, prompts: Sequence[str], chunk: int = 512) -> SecondMoment:
    """C_p (or C_d): all max_length token states of every prompt, summed in chunks."""
    total = SecondMoment.zeros(encoder.dim)
    for i in range(0, len(prompts), chunk):
        total += SecondMoment.of(encoder.encode(prompts[i : i + chunk]), encoder.pooled_width)
    return total


# ---------------------------------------------------------------- prior cache


def read_captions(path: str | Path) -> list[str]:
    """One caption per line; blank lines ignored. Errors name the file."""
    p = Path(path)
    if not p.is_file():
        raise ConceptError(f"caption file {str(path)!r} does not exist")
    try:
        # utf-8-sig: a byte-order mark is not part of the first caption.
        lines = [ln.strip() for ln in p.read_text(encoding="utf-8-sig").splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise ConceptError(f"caption file {str(path)!r} cannot be read: {e}") from None
    caps = [ln for ln in lines if ln]
    if not caps:
        raise ConceptError(f"caption file {str(path)!r} has no captions")
    return caps


def default_captions_path() -> Path:
    from importlib import resources

    return Path(str(resources.files("mace_core").joinpath("data/captions.txt")))


def prior_cache_key(text_fingerprint: str, captions: Sequence[str], dtype: torch.dtype = TEXT_DTYPE) -> str:
    """Cache key: the text side's fingerprint (``ModelFingerprint.text``), the dtype its token
    states are computed in (``TEXT_DTYPE``, whatever the checkpoint's) and the exact caption list."""
    h = hashlib.sha256(text_fingerprint.encode())
    h.update(f"\0{dtype}".encode())
    h.update(f"\0method {version.METHOD_VERSION}".encode())  # mace_core/version.py: a new method, a new prior
    for c in captions:
        h.update(b"\n" + c.encode())
    return h.hexdigest()[:16]


def second_moment_bytes(stats: SecondMoment, metadata: dict[str, str] | None = None) -> bytes:
    """Serialise C, n (and a pooled block) as a sealed safetensors file (the prior cache format)."""
    tensors = {"C": stats.C.contiguous(), "n": torch.tensor(stats.n, dtype=torch.int64)}
    return sealed_bytes({**tensors, **pooled_tensors("", stats.pooled)}, metadata)


def second_moment_from_bytes(data: bytes, what: str) -> SecondMoment:
    t, _ = open_sealed(data, what)
    try:
        return SecondMoment(t["C"].double(), int(t["n"]), pooled_from(t, ""))
    except KeyError as e:
        raise ArtefactError(f"{what} lacks tensor {e}") from None
