"""What a stored result depends on is in its key: the method version and the prompt files in
the run id, the prior key and the data key; and input files read as the user meant them
(a byte-order mark is not part of the first concept or caption)."""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

import pytest
from helpers import request

import mace_core.prompts as prompts
import mace_core.version as method_version
from mace_core.concepts import Concept, ConceptType, read_concept_file
from mace_core.text_stats import read_captions
from mace_ray.erase.driver import prepare
from mace_ray.erase.layout import data_key

BOM = "\ufeff"


@pytest.fixture(scope="module")
def prompt_data(tmp_path_factory) -> Path:
    """A copy of the packaged prompt files (mace_core/data), free to edit."""
    copy = tmp_path_factory.mktemp("prompt-data") / "data"
    shutil.copytree(Path(str(resources.files("mace_core").joinpath("data"))), copy)
    return copy


def test_a_changed_template_or_held_out_file_changes_the_prompt_digest(prompt_data, tmp_path):
    assert prompts.prompt_data_digest(prompt_data) == prompts.prompt_data_digest()
    for rel in ("templates/object.txt", "heldout/celebrity.txt", "heldout_captions.txt"):
        edited = tmp_path / rel.replace("/", "-")
        shutil.copytree(prompt_data, edited)
        with open(edited / rel, "a", encoding="utf-8") as f:
            f.write("a new line with {} in it\n")
        assert prompts.prompt_data_digest(edited) != prompts.prompt_data_digest(), rel


def test_template_files_and_the_method_version_make_a_new_run(prompt_data, tmp_path, monkeypatch):
    cfile = tmp_path / "c.txt"
    cfile.write_text("airplane | object | sky\n")
    req = request(cfile, tmp_path / "out", executor="local")
    airplane = Concept("airplane", ConceptType.OBJECT, "sky")
    base = prepare(req)
    base_data = data_key(base.model_fingerprint, airplane, req.settings)

    # One template line more: another run (its statistics and LoRAs differ), the same
    # prior and training images (neither is made from a template).
    edited = tmp_path / "edited"
    shutil.copytree(prompt_data, edited)
    with open(edited / "templates" / "object.txt", "a", encoding="utf-8") as f:
        f.write("a sketch of the {} at dusk\n")
    monkeypatch.setattr(prompts, "_packaged_prompt_digest", lambda: prompts.prompt_data_digest(edited))
    other = prepare(req)
    assert other.run_id != base.run_id
    assert other.prior_key == base.prior_key
    assert data_key(other.model_fingerprint, airplane, req.settings) == base_data
    monkeypatch.undo()

    # Another method version: every key changes, nothing is resumed or reused across it.
    monkeypatch.setattr(method_version, "METHOD_VERSION", method_version.METHOD_VERSION + 1)
    bumped = prepare(req)
    assert bumped.run_id != base.run_id and bumped.prior_key != base.prior_key
    assert data_key(bumped.model_fingerprint, airplane, req.settings) != base_data
    monkeypatch.undo()
    assert prepare(req).run_id == base.run_id  # and nothing else in the key moved


def test_a_byte_order_mark_is_not_part_of_the_first_line(tmp_path):
    concepts = tmp_path / "concepts.txt"
    concepts.write_text(f"{BOM}airplane | object | sky\nVan Gogh | style\n", encoding="utf-8")
    parsed = read_concept_file(concepts, ConceptType.OBJECT).concepts
    assert [c.text for c in parsed] == ["airplane", "Van Gogh"]
    # The same file written without the mark gives the same concepts (so the same run).
    plain = tmp_path / "plain.txt"
    plain.write_text("airplane | object | sky\nVan Gogh | style\n", encoding="utf-8")
    assert read_concept_file(plain, ConceptType.OBJECT).concepts == parsed
    # Retained sets are concept files too; captions have their own reader.
    captions = tmp_path / "captions.txt"
    captions.write_text(f"{BOM}a cat on a sofa\na red bus\n", encoding="utf-8")
    assert read_captions(captions) == ["a cat on a sofa", "a red bus"]
