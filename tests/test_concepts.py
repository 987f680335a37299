"""Concept-file syntax, duplicates, bad input and slugs."""

from __future__ import annotations

import pytest

from mace_core.concepts import (
    DEFAULT_ANCHORS,
    ConceptType,
    concept_slug,
    parse_concept_lines,
    read_concept_file,
)
from mace_core.errors import ConceptError
from mace_core.prompts import concept_prompts, prompt_pairs, templates


def test_syntax_types_anchors_comments():
    lines = [
        "# a comment",
        "",
        "Bill Clinton | celebrity",
        "  Van Gogh |style  ",
        "airplane | object | sky",
        "Angelina Jolie | | a woman",
        "cat",
    ]
    cl = parse_concept_lines(lines, "x.txt", default_type=ConceptType.CELEBRITY)
    got = [(c.text, c.type.value, c.anchor) for c in cl.concepts]
    assert got == [
        ("Bill Clinton", "celebrity", "a person"),
        ("Van Gogh", "style", "art"),
        ("airplane", "object", "sky"),
        ("Angelina Jolie", "celebrity", "a woman"),
        ("cat", "celebrity", "a person"),
    ]
    assert cl.duplicates == []


def test_duplicates_are_reported_and_dropped():
    cl = parse_concept_lines(["Bill Clinton", "bill   clinton | celebrity", "dog", "Bill Clinton"], "c.txt")
    assert [c.text for c in cl.concepts] == ["Bill Clinton", "dog"]
    assert [(d["line"], d["first_line"]) for d in cl.duplicates] == [(2, 1), (4, 1)]


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([], "no concepts"),
        (["# only a comment", "   "], "no concepts"),
        (["dog", "   | celebrity"], r"c.txt:2: concept is empty"),
        (
            ["dog | animal"],
            r"c.txt:1: unknown concept type 'animal' \(valid: object, celebrity, style, explicit\)",
        ),
        (["dog | object | scene | extra"], "expected 'text | type | anchor'"),
        (["scene | object | scene"], "mapped to itself"),
    ],
)
def test_bad_concept_lines(lines, message):
    with pytest.raises(ConceptError, match=message):
        parse_concept_lines(lines, "c.txt")


def test_missing_and_undecodable_files(tmp_path):
    with pytest.raises(ConceptError, match="does not exist"):
        read_concept_file(tmp_path / "nope.txt")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ConceptError, match="cannot be read"):
        read_concept_file(bad)


@pytest.mark.parametrize("text", ["../../etc/passwd", "a/b\\c", "..", "名前", "Beyoncé", "  x  ", "C#"])
def test_slugs_never_escape(text):
    slug = concept_slug(text)
    assert slug and all(ch.isascii() and (ch.isalnum() or ch == "-") for ch in slug)
    assert not slug.startswith("-") and ".." not in slug and "/" not in slug


def test_slugs_distinguish_texts():
    assert concept_slug("Bill Clinton") != concept_slug("Bill-Clinton")
    assert concept_slug("Bill Clinton") == concept_slug("bill  clinton")


@pytest.mark.parametrize("type_", list(ConceptType))
def test_templates_per_type(type_):
    ts = templates(type_)
    assert 30 <= len(ts) <= 40 and len(set(ts)) == len(ts)
    c = parse_concept_lines([f"Example Name | {type_.value}"], "t").concepts[0]
    pairs = prompt_pairs(c)
    assert all("Example Name" in p.concept and DEFAULT_ANCHORS[type_] in p.anchor for p in pairs)
    assert concept_prompts(c) == [p.concept for p in pairs]
