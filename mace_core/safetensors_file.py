"""A safetensors file on disk, read and rewritten at the byte level.

An erased model's weight file is its source's with some tensors' bytes replaced: the
header (names, dtypes, shapes, offsets and ``__metadata__``) and every other tensor stay
byte for byte what they were. A tensor replaced by one of the same dtype and shape keeps
its offsets, so nothing is re-serialised and the file is never loaded whole.

Layout (safetensors' own): an 8-byte little-endian header length N, N bytes of JSON, then
the tensor bytes; each header entry's ``data_offsets`` are relative to their start.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from mace_core.errors import ArtefactError

# The float dtypes an edited tensor can be written in (safetensors names).
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# safetensors refuses headers larger than this; a larger length is a damaged file.
MAX_HEADER = 100 * 2**20


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the file: its dtype (safetensors name), shape and absolute byte range."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    """The tensors of a safetensors file, by name, and its ``__metadata__``."""

    path: Path
    entries: dict[str, TensorEntry]
    metadata: dict[str, str]

    @classmethod
    def read(cls, path: Path, what: str) -> SafetensorsHeader:
        """The header of ``path``; ArtefactError naming ``what`` when it is not a safetensors file."""
        try:
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                if not 0 < n <= MAX_HEADER:
                    raise ValueError(f"header length {n}")
                raw = json.loads(f.read(n))
                size = f.seek(0, 2)
        except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ArtefactError(f"{what} is not a readable safetensors file: {str(e)[:200]}") from None
        if not isinstance(raw, dict):
            raise ArtefactError(f"{what} is not a readable safetensors file: its header is not an object")
        entries: dict[str, TensorEntry] = {}
        for name, e in raw.items():
            if name == "__metadata__":
                continue
            try:
                start, end = (8 + n + int(x) for x in e["data_offsets"])
                entry = TensorEntry(str(e["dtype"]), tuple(int(s) for s in e["shape"]), start, end)
            except (KeyError, TypeError, ValueError):
                raise ArtefactError(f"{what}: tensor {name!r} has a malformed header entry") from None
            if not 8 + n <= start <= end <= size:
                raise ArtefactError(f"{what}: tensor {name!r} lies outside the file (truncated?)")
            entries[name] = entry
        return cls(path, entries, dict(raw.get("__metadata__") or {}))

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor, read from its byte range (a float dtype of ``DTYPES``)."""
        e = self.entries[name]
        dtype = DTYPES[e.dtype]
        with open(self.path, "rb") as f:
            f.seek(e.start)
            data = bytearray(f.read(e.end - e.start))
        return (
            torch.frombuffer(data, dtype=dtype).reshape(e.shape)
            if data
            else torch.empty(e.shape, dtype=dtype)
        )


def entry_bytes(value: torch.Tensor, entry: TensorEntry, what: str) -> bytes:
    """``value`` as the bytes of ``entry``: its dtype (cast to it) and its shape, little-endian."""
    if entry.dtype not in DTYPES:
        raise ArtefactError(f"{what} is stored as {entry.dtype}, not a float dtype an edit can be written in")
    if tuple(value.shape) != entry.shape:
        raise ArtefactError(f"{what} has shape {entry.shape}; the edit's is {tuple(value.shape)}")
    # Tensors are little-endian in memory on every platform torch supports, as in the file.
    data = value.detach().to("cpu", DTYPES[entry.dtype]).contiguous().view(torch.uint8).numpy().tobytes()
    if len(data) != entry.end - entry.start:
        raise ArtefactError(f"{what}: {len(data)} bytes for a byte range of {entry.end - entry.start}")
    return data


def write_patched(header: SafetensorsHeader, dest: Path, replaced: dict[str, torch.Tensor]) -> None:
    """``dest``: a copy of ``header.path`` with the tensors of ``replaced`` overwritten in
    place, each in its stored dtype; every other byte (header, metadata, other tensors) is
    the source's."""
    patches = [
        (header.entries[name], entry_bytes(value, header.entries[name], f"tensor {name!r} of {header.path}"))
        for name, value in sorted(replaced.items())
    ]
    shutil.copyfile(header.path, dest)
    with open(dest, "r+b") as f:
        for entry, data in patches:
            f.seek(entry.start)
            f.write(data)
