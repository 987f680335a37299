"""CLIP's text side built offline: its real tokenizer from the vocabulary shipped as package
data, and the tiny text tower the tiny pipeline and the tiny evaluation CLIP share."""

from __future__ import annotations

import gzip
import json
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

from mace_core.errors import ModelLoadError

# The widths of a tiny CLIP tower: the tiny text tower below and the tiny evaluation CLIP's
# vision tower are built alike.
TINY_TOWER = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
)
# CLIP's real vocabulary, 77 positions and special-token ids: what a text tower fed by
# ``clip_tokenizer`` needs, whatever its widths.
CLIP_VOCAB = dict(
    vocab_size=49408,
    max_position_embeddings=77,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)
# The tiny CLIP text tower: the tiny pipeline's text encoder and the tiny evaluation CLIP
# share it.
TINY_CLIP_TEXT = dict(TINY_TOWER, **CLIP_VOCAB)


def tiny_clip_text(width: int, **overrides: Any) -> dict[str, Any]:
    """``TINY_CLIP_TEXT`` at ``width`` (its MLP twice as wide) with a family's ``overrides``: the
    text encoders of the tiny pipelines."""
    return dict(TINY_CLIP_TEXT, hidden_size=width, intermediate_size=2 * width, **overrides)


def _clip_vocab_path() -> Path:
    """CLIP's BPE vocabulary, shipped as package data (mace_core/data/clip/SOURCE.md)."""
    from importlib import resources

    path = Path(str(resources.files("mace_core").joinpath("data/clip/bpe_simple_vocab_16e6.txt.gz")))
    if not path.is_file():
        raise ModelLoadError(f"CLIP vocabulary not found at {path} (a broken install of mace-ray)")
    return path


def _bytes_to_unicode() -> dict[int, str]:
    # The reversible byte -> printable-character map of GPT-2/CLIP byte-level BPE.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def write_clip_tokenizer_files(folder: Path) -> None:
    """Write vocab.json / merges.txt of the real CLIP tokenizer (49408 tokens)."""
    with gzip.open(_clip_vocab_path(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    base = list(_bytes_to_unicode().values())
    vocab = base + [v + "</w>" for v in base] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({v: i for i, v in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8"
    )


@lru_cache(maxsize=2)
def clip_tokenizer(pad_token: str = "<|endoftext|>"):  # -> CLIPTokenizer
    """The real CLIP tokenizer, built offline from CLIP's vocabulary: padding with end-of-text
    as SD 1.x's does, or with ``pad_token="!"`` (id 0) as SD 2.x's OpenCLIP tokenizer does."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_clip_tokenizer_files(Path(tmp))
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=77, pad_token=pad_token)
