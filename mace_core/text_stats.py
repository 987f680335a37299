"""Text-encoder statistics: CFR sums X, C (Eq. 1-2), fusion sums C_k (Eq. 7), prior C_p.

Every statistic is a sum of outer products of the token states of the UNet's
cross-attention context (a family's ``PromptEncoder.encode``: the final text-encoder
states for SD 1.x / 2.x), accumulated in float64, together with its token count. They
are additive: the statistics of many concepts are the sum of the statistics of each.
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


@dataclass
class SecondMoment:
    """C = sum e e^T over n token states (float64). Additive."""

    C: torch.Tensor
    n: int

    @classmethod
    def zeros(cls, d: int) -> SecondMoment:
        return cls(torch.zeros(d, d, dtype=torch.float64), 0)

    @classmethod
    def of(cls, states: torch.Tensor) -> SecondMoment:
        e = states.reshape(-1, states.shape[-1]).double()
        return cls(e.T @ e, e.shape[0])

    def __add__(self, other: SecondMoment) -> SecondMoment:
        return SecondMoment(self.C + other.C, self.n + other.n)

    def __iadd__(self, other: SecondMoment) -> SecondMoment:
        self.C += other.C
        self.n += other.n
        return self

    def mean(self) -> torch.Tensor:
        return self.C / max(self.n, 1)


@dataclass
class MappingStats:
    """CFR statistics of Eq. 1: X = sum e_g e_f^T, C = sum e_f e_f^T over n aligned pairs."""

    X: torch.Tensor
    C: torch.Tensor
    n: int

    @classmethod
    def zeros(cls, d: int) -> MappingStats:
        z = torch.zeros(d, d, dtype=torch.float64)
        return cls(z, z.clone(), 0)

    def __add__(self, other: MappingStats) -> MappingStats:
        return MappingStats(self.X + other.X, self.C + other.C, self.n + other.n)

    def __iadd__(self, other: MappingStats) -> MappingStats:
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
        stats += MappingStats(g.T @ f, f.T @ f, f.shape[0])
    return stats


@dataclass
class ConceptTextStats:
    """Everything the closed forms need from one concept's prompts."""

    mapping: MappingStats  # CFR, Eq. 1-2
    fusion: SecondMoment  # C_k of Eq. 7: all token states of its augmented prompts

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {
            "cfr.X": self.mapping.X,
            "cfr.C": self.mapping.C,
            "cfr.n": torch.tensor(self.mapping.n, dtype=torch.int64),
            "fusion.C": self.fusion.C,
            "fusion.n": torch.tensor(self.fusion.n, dtype=torch.int64),
        }

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> ConceptTextStats:
        try:
            return cls(
                MappingStats(t["cfr.X"].double(), t["cfr.C"].double(), int(t["cfr.n"])),
                SecondMoment(t["fusion.C"].double(), int(t["fusion.n"])),
            )
        except KeyError as e:
            raise ArtefactError(f"concept statistics lack {e}") from None


def concept_text_stats(
    encoder: PromptEncoder, concept: Concept, n_prompts: int | None = None
) -> ConceptTextStats:
    """CFR and fusion statistics of one concept."""
    pairs = prompt_pairs(concept, n_prompts)
    for p in pairs:
        encoder.check_length(p.concept, f"concept {quoted(concept.text)}")
        encoder.check_length(p.anchor, f"anchor {quoted(concept.anchor)} of concept {quoted(concept.text)}")
    fusion = SecondMoment.of(encoder.encode(concept_prompts(concept)[: len(pairs)]))
    return ConceptTextStats(mapping_stats(encoder, pairs), fusion)


def prompt_second_moment(encoder: PromptEncoder, prompts: Sequence[str], chunk: int = 512) -> SecondMoment:
    """C_p (or C_d): all max_length token states of every prompt, summed in chunks."""
    total = SecondMoment.zeros(encoder.dim)
    for i in range(0, len(prompts), chunk):
        total += SecondMoment.of(encoder.encode(prompts[i : i + chunk]))
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
    """Serialise C and n as a sealed safetensors file (the prior cache format)."""
    return sealed_bytes({"C": stats.C.contiguous(), "n": torch.tensor(stats.n, dtype=torch.int64)}, metadata)


def second_moment_from_bytes(data: bytes, what: str) -> SecondMoment:
    t, _ = open_sealed(data, what)
    try:
        return SecondMoment(t["C"].double(), int(t["n"]))
    except KeyError as e:
        raise ArtefactError(f"{what} lacks tensor {e}") from None
