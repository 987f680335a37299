"""Token alignment on the real CLIP tokenizer (CLIP's vocabulary, shipped as package data)."""

from __future__ import annotations

import pytest

from mace_core.alignment import align_tokens


def ids(tok, text):
    return list(tok(text).input_ids)


def test_real_clip_tokenization(tokenizer):
    assert ids(tokenizer, "a photo of a cat") == [49406, 320, 1125, 539, 320, 2368, 49407]


@pytest.mark.parametrize(
    ("concept_prompt", "anchor_prompt", "concept"),
    [
        (
            "a photo of Bill Clinton at the beach",
            "a photo of a person at the beach",
            "Bill Clinton",
        ),  # middle
        ("Leonardo DiCaprio giving a speech", "a person giving a speech", "Leonardo DiCaprio"),  # start
        ("a portrait of Leonardo DiCaprio", "a portrait of a person", "Leonardo DiCaprio"),  # end
        (
            "a painting in the style of Van Gogh",
            "a painting in the style of art",
            "Van Gogh",
        ),  # longer->shorter
        (
            "a photo of nudity on a beach",
            "a photo of a person wearing clothes on a beach",
            "nudity",
        ),  # shorter
    ],
)
def test_alignment_pairs_roles_and_drops_concept(tokenizer, concept_prompt, anchor_prompt, concept):
    f, g = ids(tokenizer, concept_prompt), ids(tokenizer, anchor_prompt)
    al = align_tokens(f, g, 77)
    concept_ids = ids(tokenizer, concept)[1:-1]
    assert len(concept_ids) >= 1
    # The dropped positions are exactly the concept's tokens.
    assert [f[i] for i in al.concept_tokens] == concept_ids
    assert not set(al.concept_tokens) & set(al.concept_positions)
    assert len(al.concept_positions) == len(al.anchor_positions)
    assert len(set(al.concept_positions)) == len(al.concept_positions)
    f_pad = f + [49407] * (77 - len(f))
    g_pad = g + [49407] * (77 - len(g))
    # Every pair is the same token in both prompts (prefix, suffix with end-of-text, padding).
    assert all(f_pad[i] == g_pad[j] for i, j in zip(al.concept_positions, al.anchor_positions, strict=True))
    # Start token first; the end-of-text tokens are paired with each other.
    assert (al.concept_positions[0], al.anchor_positions[0]) == (0, 0)
    assert (len(f) - 1, len(g) - 1) in set(zip(al.concept_positions, al.anchor_positions, strict=True))
    # Positions after the concept keep their order: suffix then padding, never crossing.
    assert al.concept_positions == sorted(al.concept_positions)
    assert al.anchor_positions == sorted(al.anchor_positions)
    assert max(al.concept_positions) < 77 and max(al.anchor_positions) < 77
    # Nothing but the concept (and, if the anchor is longer, the padding it pushes out) is lost.
    assert len(al.concept_positions) == 77 - len(concept_ids) - max(0, len(g) - len(f))


def test_multi_token_names(tokenizer):
    assert len(ids(tokenizer, "Leonardo DiCaprio")[1:-1]) >= 2
    assert len(ids(tokenizer, "Bill Clinton")[1:-1]) == 2


def test_alignment_rejects_too_long_prompts():
    with pytest.raises(ValueError, match="exceeds"):
        align_tokens(list(range(80)), [1, 2], 77)
