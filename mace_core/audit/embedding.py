"""Prompts whose words may carry their own input embeddings, encoded differentiably.

Every attack of the audit ends in an ``AttackPrompt``: the word(s) that fill a template's
``{}`` and, optionally, the input token embeddings those words' tokens get instead of the
vocabulary's (a learned token for concept inversion, a perturbed concept for the soft-prompt
search). ``TokenEncoder`` runs a family's CLIP text encoder on templates filled with such a
prompt, with or without gradients, and gives the cross-attention context the UNet's attn2
to_k / to_v see: the token states every measure of the audit is built from.

The embeddings are injected at the text encoder's input embedding layer (a forward hook),
so position embeddings, the causal attention and the final layer norm are the model's own:
a learned token behaves exactly as a new vocabulary entry would.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from mace_core.errors import ConceptError, ModelLoadError, quoted
from mace_core.families.base import PromptEncoder
from mace_core.families.stable_diffusion import TextEncoder
from mace_core.train import find_subsequences

# The word a learned token stands in for: one token of CLIP's vocabulary (a rare made-up
# word, "sks</w>") that no template uses, so its position in a filled template is
# unambiguous. A letter-based word: CLIP's tokenizer glues punctuation runs together
# ("*," is one token), never letters to the punctuation after them.
PLACEHOLDER = "sks"


@dataclass(frozen=True)
class AttackPrompt:
    """What an attack puts where a template says ``{}``.

    ``embeddings``: None (the words' own tokens), or one input embedding per token of
    ``word`` (k, d_in), used in place of the vocabulary's.
    """

    word: str
    embeddings: torch.Tensor | None = None

    def fill(self, template: str) -> str:
        return template.format(self.word)

    def detached(self) -> AttackPrompt:
        """A copy on the CPU without gradient history (what results keep)."""
        e = None if self.embeddings is None else self.embeddings.detach().float().cpu().clone()
        return AttackPrompt(self.word, e)


class TokenEncoder:
    """A CLIP text encoder (SD 1.x / 2.x) that takes ``AttackPrompt``s.

    ``encode`` gives the same token states as the family's ``PromptEncoder.encode`` for a
    plain prompt (same tokenizer call, same model call), so the audit's figures and the
    erasure report's agree.
    """

    def __init__(self, encoder: PromptEncoder) -> None:
        if not isinstance(encoder, TextEncoder):
            raise ModelLoadError(
                f"the audit's attacks need a single CLIP text encoder (SD 1.x / 2.x); "
                f"this model's is a {type(encoder).__name__}"
            )
        self.tokenizer = encoder.tokenizer
        self.model = encoder.model
        self.device = encoder.device
        self.max_length = encoder.max_length
        self.table = self.model.get_input_embeddings()  # nn.Embedding (vocab, d_in)

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def embedding_dim(self) -> int:
        return int(self.table.weight.shape[1])

    def ids(self, text: str) -> list[int]:
        """Unpadded token ids with start/end tokens."""
        return list(self.tokenizer(text, truncation=False).input_ids)

    def word_ids(self, word: str) -> list[int]:
        """The tokens of ``word`` alone (without start/end tokens)."""
        return self.ids(word)[1:-1]

    def token_embeddings(self, word: str) -> torch.Tensor:
        """The vocabulary's input embeddings of ``word``'s tokens, (k, d_in) float32, detached."""
        ids = torch.tensor(self.word_ids(word), device=self.table.weight.device)
        return self.table(ids).detach().float()

    def span(self, template: str, word: str) -> tuple[list[int], int, int]:
        """Token ids of the filled template and where ``word``'s tokens sit in it (start, k).

        CLIP's tokenizer splits at spaces and punctuation, so the template's text before
        ``{}`` tokenizes alone as it does in the filled prompt: the word starts right after it.
        """
        ids = self.ids(template.format(word))
        sub = self.word_ids(word)
        start = len(self.ids(template.split("{}", 1)[0].strip())) - 1
        if ids[start : start + len(sub)] != sub:  # a tokenization that merged across the boundary
            found = find_subsequences(ids, sub)
            if not found:
                raise ConceptError(f"the tokens of {quoted(word)} are not found in {quoted(template)}")
            start = found[0]
        return ids, start, len(sub)

    def padded(self, prompts: Sequence[str]) -> torch.Tensor:
        tok = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            return_tensors="pt",
        )
        return tok.input_ids

    @contextmanager
    def _injected(self, rows: list[int], starts: list[int], embeddings: torch.Tensor) -> Iterator[None]:
        """While active, the input embeddings of row ``rows[i]`` at ``starts[i] ..`` are ``embeddings``."""
        k = embeddings.shape[0]

        def hook(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            out = out.clone()  # the table's output may be a view of shared memory
            e = embeddings.to(out.device, out.dtype)
            for r, s in zip(rows, starts, strict=True):
                out[r, s : s + k] = e
            return out

        handle = self.table.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    def encode(self, templates: Sequence[str], prompt: AttackPrompt, grad: bool = False) -> torch.Tensor:
        """The cross-attention context of every template filled with ``prompt``:
        (len(templates), max_length, dim), float32 on the encoder's device; differentiable
        in ``prompt.embeddings`` when ``grad``."""
        prompts = [prompt.fill(t) for t in templates]
        ids = self.padded(prompts).to(self.device)
        with torch.set_grad_enabled(grad):
            if prompt.embeddings is None:
                return self.model(ids)[0].float()
            spans = [self.span(t, prompt.word) for t in templates]
            if any(k != prompt.embeddings.shape[0] for _, _, k in spans):
                raise ValueError(
                    f"{prompt.embeddings.shape[0]} embeddings for the {spans[0][2]} tokens of {prompt.word!r}"
                )
            with self._injected(list(range(len(prompts))), [s for _, s, _ in spans], prompt.embeddings):
                return self.model(ids)[0].float()

    def encode_texts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Plain prompts (no injected embeddings), no gradients: (N, max_length, dim)."""
        with torch.no_grad():
            return self.model(self.padded(prompts).to(self.device))[0].float()
