"""Prompts whose words may carry their own input embeddings, encoded differentiably.

Every attack of the audit ends in an ``AttackPrompt``: the word(s) that fill a template's
``{}`` and, optionally, the input token embeddings those words' tokens get instead of the
vocabulary's (a learned token for concept inversion, a perturbed concept for the soft-prompt
search), one set per text encoder of the model's family (SD 1.x / 2.x: one CLIP; SDXL: two
CLIPs; FLUX.1: CLIP and T5; SD 3.x: two CLIPs and T5), in the order of its
``PromptEncoder.text_towers``. ``TokenEncoder`` runs the family's own prompt encoder on
templates filled with such a prompt, with or without gradients, and gives the token states
the edited projections see (``encode``) and the denoiser's whole conditioning
(``conditioning``): every measure of the audit is built from them.

The embeddings are injected at each text encoder's input embedding layer (a forward hook
that replaces the rows of the word's tokens wherever they occur), so position embeddings,
the causal attention, the layers a family reads and its pooled outputs are the model's own:
a learned token behaves exactly as a new vocabulary entry would, in every encoder at once.
The pipeline's own prompt encoding goes through the same layers, so images of an attack's
prompt are the family's ordinary generation with the hooks in place (``injected``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mace_core.errors import ConceptError, quoted
from mace_core.families.base import Conditioning, PromptEncoder, conditioning_to
from mace_core.token_positions import find_subsequences

# The word a learned token stands in for: one token of CLIP's vocabulary (a rare made-up
# word, "sks</w>") that no template uses, so its position in a filled template is
# unambiguous. A letter-based word: CLIP's tokenizer glues punctuation runs together
# ("*," is one token), never letters to the punctuation after them.
PLACEHOLDER = "sks"

# Names of the stored embedding tensors, one per text encoder (as diffusers names the
# encoders: text_encoder, text_encoder_2, ...).
EMBEDDINGS_KEY = "embeddings"


def embeddings_key(i: int) -> str:
    """The stored name of the i-th text encoder's embeddings: embeddings, embeddings_2, ..."""
    return EMBEDDINGS_KEY if i == 0 else f"{EMBEDDINGS_KEY}_{i + 1}"


@dataclass(frozen=True)
class AttackPrompt:
    """What an attack puts where a template says ``{}``.

    ``embeddings``: None (the words' own tokens), or per text encoder of the family one input
    embedding per token of ``word`` in that encoder's tokenization (k_i, d_i), used in place
    of the vocabulary's.
    """

    word: str
    embeddings: tuple[torch.Tensor, ...] | None = None

    def fill(self, template: str) -> str:
        return template.format(self.word)

    def detached(self) -> AttackPrompt:
        """A copy on the CPU without gradient history (what results keep)."""
        if self.embeddings is None:
            return AttackPrompt(self.word)
        return AttackPrompt(self.word, tuple(e.detach().float().cpu().clone() for e in self.embeddings))

    @property
    def learned_tokens(self) -> int:
        """Input embeddings the prompt carries: the word's tokens in the first text encoder."""
        return 0 if self.embeddings is None else int(self.embeddings[0].shape[0])

    def tensors(self) -> dict[str, torch.Tensor]:
        """The embeddings by stored name (``embeddings_key``), contiguous; {} without any."""
        if self.embeddings is None:
            return {}
        return {embeddings_key(i): e.contiguous() for i, e in enumerate(self.embeddings)}


@dataclass(frozen=True)
class TextTower:
    """One text encoder of a family and its tokenizer."""

    tokenizer: Any
    model: nn.Module

    @property
    def table(self) -> nn.Module:
        """The input embedding table (nn.Embedding (vocab, d_in))."""
        return self.model.get_input_embeddings()

    def ids(self, text: str) -> list[int]:
        """Unpadded token ids of a prompt, with the tokenizer's special tokens."""
        return list(self.tokenizer(text, truncation=False).input_ids)

    def word_ids(self, word: str) -> list[int]:
        """The tokens of ``word`` as it appears inside a prompt (no special tokens)."""
        return list(self.tokenizer(word, add_special_tokens=False).input_ids)


class TokenEncoder:
    """A family's prompt encoder that takes ``AttackPrompt``s.

    ``encode`` gives the same token states as the family's ``PromptEncoder.encode`` for a
    plain prompt (it is that call), so the audit's figures and the erasure report's agree.
    """

    def __init__(self, encoder: PromptEncoder) -> None:
        self.prompts = encoder
        self.towers = [TextTower(tok, model) for tok, model in encoder.text_towers()]
        self.device = encoder.device

    @property
    def dim(self) -> int:
        return self.prompts.dim

    def freeze(self) -> None:
        """No text encoder parameter trains: attacks train only their own embeddings."""
        for tower in self.towers:
            tower.model.requires_grad_(False)

    def word_ids(self, word: str) -> tuple[tuple[int, ...], ...]:
        """The tokens of ``word`` in every text encoder's tokenization."""
        return tuple(tuple(t.word_ids(word)) for t in self.towers)

    def token_embeddings(self, word: str) -> tuple[torch.Tensor, ...]:
        """The vocabulary's input embeddings of ``word``'s tokens per text encoder,
        (k_i, d_i) float32, detached."""
        out = []
        for tower in self.towers:
            table = tower.table
            ids = torch.tensor(tower.word_ids(word), device=table.weight.device, dtype=torch.long)
            out.append(table(ids).detach().float())
        return tuple(out)

    def embedding_scales(self) -> tuple[torch.Tensor, ...]:
        """The RMS of each text encoder's vocabulary embeddings (a scalar tensor each)."""
        return tuple(t.table.weight.detach().float().pow(2).mean().sqrt() for t in self.towers)

    def fits(self, prompt: str) -> bool:
        """Whether ``prompt`` fits every text encoder's window."""
        try:
            self.prompts.check_length(prompt, "attack prompt")
        except ConceptError:
            return False
        return True

    def _check(self, prompts: Sequence[str], prompt: AttackPrompt) -> None:
        """Every prompt must contain the word's tokens in every encoder, and the embeddings
        must match them in number; errors name the word and the prompt."""
        assert prompt.embeddings is not None
        if len(prompt.embeddings) != len(self.towers):
            raise ValueError(
                f"{len(prompt.embeddings)} sets of embeddings for {len(self.towers)} text encoders"
            )
        for tower, e in zip(self.towers, prompt.embeddings, strict=True):
            sub = tower.word_ids(prompt.word)
            if e.shape[0] != len(sub):
                raise ValueError(f"{e.shape[0]} embeddings for the {len(sub)} tokens of {prompt.word!r}")
            for p in prompts:
                if not find_subsequences(tower.ids(p), sub):
                    raise ConceptError(f"the tokens of {quoted(prompt.word)} are not found in {quoted(p)}")

    @contextmanager
    def injected(self, prompt: AttackPrompt, prompts: Sequence[str] = ()) -> Iterator[None]:
        """While active, every occurrence of ``prompt.word``'s tokens that any text encoder
        embeds gets ``prompt.embeddings`` (nothing changes without embeddings). ``prompts``:
        the prompts about to be encoded, checked to contain the word (``_check``)."""
        if prompt.embeddings is None:
            yield
            return
        self._check(prompts, prompt)
        with ExitStack() as stack:
            for tower, e in zip(self.towers, prompt.embeddings, strict=True):
                handle = tower.table.register_forward_hook(_replacer(tower.word_ids(prompt.word), e))
                stack.callback(handle.remove)
            yield

    def encode(self, templates: Sequence[str], prompt: AttackPrompt, grad: bool = False) -> torch.Tensor:
        """The edited projections' token states of every template filled with ``prompt``:
        (len(templates), rows, dim), float32 on the encoder's device; differentiable in
        ``prompt.embeddings`` when ``grad``."""
        prompts = [prompt.fill(t) for t in templates]
        with self._mode(grad), self.injected(prompt, prompts):
            return self.prompts.encode(prompts).to(self.device)

    def conditioning(
        self, templates: Sequence[str], prompt: AttackPrompt, grad: bool = False
    ) -> Conditioning:
        """The denoiser's conditioning of every template filled with ``prompt`` (the family's
        ``conditioning``: context, pooled embeddings, ...), on the encoder's device."""
        prompts = [prompt.fill(t) for t in templates]
        with self._mode(grad), self.injected(prompt, prompts):
            return conditioning_to(self.prompts.conditioning(prompts), self.device)

    @contextmanager
    def _mode(self, grad: bool) -> Iterator[None]:
        if not grad:
            yield
            return
        with self.prompts.differentiable(), torch.enable_grad():
            yield


def _replacer(sub: list[int], embeddings: torch.Tensor):
    """A forward hook of an embedding table: the rows of every occurrence of ``sub`` in its
    input ids become ``embeddings`` (k, d)."""
    k = len(sub)

    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        hits = [(r, s) for r, row in enumerate(args[0].tolist()) for s in find_subsequences(row, sub)]
        if not hits:
            return out
        out = out.clone()  # the table's output may be a view of shared memory
        e = embeddings.to(out.device, out.dtype)
        for r, s in hits:
            out[r, s : s + k] = e
        return out

    return hook
