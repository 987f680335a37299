"""T5's text side built offline: a T5 tokenizer made from a small corpus, and the tiny T5
encoder of the tiny FLUX.1 / SD 3.x pipelines.

The tokenizer is what the real T5 v1.1 tokenizers are, in small: a Unigram model (the
``tokenizers`` library's, as SentencePiece's) over Metaspace pieces ('▁' marks a word start),
ids <pad> = 0, </s> = 1, <unk> = 2, no start token and </s> appended to every text. Its
vocabulary comes from the package's own prompt files (templates, held-out templates,
captions), deterministically: every printable ASCII character alone and after '▁' (so any
ASCII text tokenizes without <unk>), then every word of the corpus as a '▁word' piece scored
by its log frequency, so known words stay whole and names split into characters.
"""

from __future__ import annotations

import math
from collections import Counter
from functools import lru_cache
from importlib import resources
from typing import Any

T5_PAD, T5_EOS, T5_UNK = "<pad>", "</s>", "<unk>"
_CORPUS = ("captions.txt", "templates", "heldout")
_CHAR_SCORE = -12.0  # below any word's log frequency: a known word is one piece

# T5 v1.1 (FLUX.1's and SD 3.x's text_encoder_2 / _3) in tiny widths; vocab_size is the
# tokenizer's, d_model each pipeline's (``tiny_t5``).
TINY_T5 = dict(
    d_kv=8,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=32,
    feed_forward_proj="gated-gelu",
    dropout_rate=0.0,
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)


def _corpus_lines() -> list[str]:
    root = resources.files("mace_core").joinpath("data")
    lines: list[str] = []
    for name in _CORPUS:
        entry = root.joinpath(name)
        files = sorted(entry.iterdir(), key=lambda f: f.name) if entry.is_dir() else [entry]
        for f in files:
            lines += [ln.replace("{}", " ").strip() for ln in f.read_text("utf-8").splitlines()]
    return [ln for ln in lines if ln]


def unigram_vocab() -> list[tuple[str, float]]:
    """(piece, log-probability) of the tokenizer, ids in list order (see the module doc)."""
    words = Counter(w for ln in _corpus_lines() for w in ln.split())
    total = sum(words.values())
    chars = [chr(c) for c in range(33, 127)]
    vocab = [(T5_PAD, 0.0), (T5_EOS, 0.0), (T5_UNK, 0.0), ("▁", _CHAR_SCORE)]
    vocab += [("▁" + c, _CHAR_SCORE) for c in chars] + [(c, _CHAR_SCORE) for c in chars]
    seen = {p for p, _ in vocab}
    for word, n in sorted(words.items(), key=lambda kv: (-kv[1], kv[0])):
        if "▁" + word not in seen:
            vocab.append(("▁" + word, math.log(n / total)))
    return vocab


@lru_cache(maxsize=4)
def t5_tokenizer(max_length: int = 512):  # -> transformers T5Tokenizer(Fast)
    """The corpus-made T5 tokenizer, ``model_max_length`` = ``max_length`` (the sequence length
    a FLUX.1 / SD 3.x family pads T5 prompts to: 512 / 256 in the real models)."""
    from transformers import T5TokenizerFast

    return T5TokenizerFast(vocab=unigram_vocab(), extra_ids=0, model_max_length=max_length)


def tiny_t5(tokenizer: Any, width: int):  # -> T5EncoderModel
    """A random T5 encoder of ``TINY_T5``'s shape at ``width`` (its MLP twice as wide) over
    ``tokenizer``'s vocabulary: the tiny FLUX.1 / SD 3.x pipelines' (seeded by their builders)."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), **TINY_T5, d_model=width, d_ff=2 * width))
