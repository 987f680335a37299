"""Grounded-SAM masks (MACE Stage 2) on tiny random models: both backends, box selection,
OR-ing, whole-image fallbacks, the concept job's notes, image/mask pairing, bad input."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from mace_core.attn2 import get_attn2_weights
from mace_core.concept_job import ConceptBatchWorker
from mace_core.concepts import Concept, ConceptType
from mace_core.errors import MaceError, ModelLoadError
from mace_core.grounding import (
    build_tiny_grounding_dino,
    grounding_text,
    select_boxes,
    tiny_bert_vocab,
)
from mace_core.imageio import png_bytes
from mace_core.masking import (
    GroundedSam,
    MaskerError,
    WholeImageMasker,
    check_masker,
    load_masker,
    union_masks,
)
from mace_core.pretrained import TINY
from mace_core.segmentation import (
    PATCH_KEY,
    build_segment_anything,
    build_tiny_transformers_sam,
    sam_model_type,
)
from mace_core.settings import MASKERS, EraseSettings, MaskSettings

CPU = torch.device("cpu")
BACKENDS = ["grounded-sam", "segment-anything"]


def images(n: int = 3, h: int = 40, w: int = 48, seed: int = 0) -> np.ndarray:
    """Non-square random images: exercises the resize / pad / un-pad of both processors."""
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def tiny_segment_anything_sam(seed: int = 1):
    """A tiny `segment_anything` Sam with random weights (the architecture mace_core builds)."""
    torch.manual_seed(seed)
    return build_segment_anything(TINY)


@pytest.fixture(scope="module")
def sam_pth(tmp_path_factory):
    """The tiny Sam's state dict saved as an original-style SAM .pth checkpoint."""
    sam = tiny_segment_anything_sam()
    path = tmp_path_factory.mktemp("sam") / "sam_tiny.pth"
    torch.save(sam.state_dict(), path)
    return path, sam.state_dict()


def masker(backend: str, sam_pth, box_threshold: float, text_threshold: float):
    segmenter = str(sam_pth[0]) if backend == "segment-anything" else None
    settings = MaskSettings(backend, None, segmenter, box_threshold, text_threshold)
    return load_masker(settings, CPU, tiny=True)


# ---------------------------------------------------------------- both backends


@pytest.mark.parametrize("backend", BACKENDS)
def test_masks_are_the_or_of_the_box_masks(backend, sam_pth):
    # Thresholds 0 keep every query box of the tiny detector: several boxes per image.
    m = masker(backend, sam_pth, 0.0, 0.0)
    assert m.name == backend
    ims = images()
    r = m(ims, "Bill Clinton")
    assert r.masks.shape == ims.shape[:3] and r.masks.dtype == bool
    assert r.fallbacks == 0 and len(r.boxes) == len(ims) and min(r.boxes) >= 2

    boxes = m.detector.detect(ims, "Bill Clinton")
    assert [len(b) for b in boxes] == r.boxes
    per_box = m.segmenter.segment(ims, boxes)
    combined = False
    for i, masks in enumerate(per_box):
        assert masks.shape == (r.boxes[i], *ims.shape[1:3]) and masks.dtype == bool
        assert np.array_equal(r.masks[i], np.logical_or.reduce(masks, axis=0))
        assert all(not (b & ~r.masks[i]).any() for b in masks)  # every box mask lies inside
        combined |= r.masks[i].sum() > max(b.sum() for b in masks)  # and boxes really add up
    assert combined
    # Same call, same masks: models are loaded once and used in eval mode.
    assert np.array_equal(m(ims, "Bill Clinton").masks, r.masks)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_box_gives_a_counted_whole_image_fallback(backend, sam_pth):
    # Strict comparisons: a box threshold of 1.0 keeps nothing.
    m = masker(backend, sam_pth, 1.0, 0.25)
    ims = images(n=2)
    r = m(ims, "airplane")
    assert r.masks.shape == (2, 40, 48) and r.masks.all()
    assert r.fallbacks == 2 and r.boxes == [0, 0]


def test_segment_anything_checkpoint_loads_its_weights(sam_pth):
    path, state = sam_pth
    m = masker("segment-anything", sam_pth, 0.3, 0.25)
    got = m.segmenter.sam.state_dict()
    assert got.keys() == state.keys()
    assert all(torch.equal(got[k], state[k]) for k in state)


def test_bf16_autocast_path_runs_on_cpu(sam_pth):
    """The CUDA precision path (bf16 autocast) exercised on the CPU: outputs stay bool masks."""
    for backend in BACKENDS:
        m = masker(backend, sam_pth, 0.0, 0.0)
        bf16 = GroundedSam(m.name, m.detector, m.segmenter, CPU, autocast_dtype=torch.bfloat16)
        r = bf16(images(n=2), "dog")
        assert r.masks.dtype == bool and r.masks.shape == (2, 40, 48) and min(r.boxes) >= 1


def test_local_folders_load_offline(tmp_path):
    det, proc = build_tiny_grounding_dino()
    det.save_pretrained(tmp_path / "gd")
    proc.save_pretrained(tmp_path / "gd")
    sam, sproc = build_tiny_transformers_sam()
    sam.save_pretrained(tmp_path / "sam")
    sproc.save_pretrained(tmp_path / "sam")
    settings = MaskSettings("grounded-sam", str(tmp_path / "gd"), str(tmp_path / "sam"), 0.0, 0.0)
    from_folders = load_masker(settings, CPU)
    builtin = load_masker(MaskSettings("grounded-sam", None, None, 0.0, 0.0), CPU, tiny=True)
    ims = images(n=2)
    a, b = from_folders(ims, "dog"), builtin(ims, "dog")
    assert a.boxes == b.boxes and np.array_equal(a.masks, b.masks)


def test_whole_image_masker():
    m = load_masker(MaskSettings(masker="whole-image"), CPU)
    assert isinstance(m, WholeImageMasker)
    r = m(images(n=2), "dog")
    assert r.masks.all() and r.masks.shape == (2, 40, 48) and r.fallbacks == 0


# ---------------------------------------------------------------- pieces


def test_union_masks():
    a = np.zeros((3, 4, 5), dtype=bool)
    a[0, 0, 0] = a[1, 1, 1] = a[2, 3, 4] = True
    u = union_masks(a)
    assert u.shape == (4, 5) and u.sum() == 3 and u[0, 0] and u[1, 1] and u[3, 4]
    assert not union_masks(np.zeros((0, 4, 5), dtype=bool)).any()
    with pytest.raises(ValueError, match=r"\(k, H, W\)"):
        union_masks(np.zeros((4, 5), dtype=bool))


def test_grounding_text():
    assert grounding_text("  Bill   Clinton ") == "bill clinton."
    assert grounding_text("dog.") == "dog."


def test_tiny_vocab_has_the_bert_ids_grounding_dino_hard_codes():
    _, proc = build_tiny_grounding_dino()
    vocab = tiny_bert_vocab()
    assert (vocab["[CLS]"], vocab["[SEP]"], vocab["."], vocab["?"]) == (101, 102, 1012, 1029)
    ids = proc.tokenizer(grounding_text("Bill Clinton"))["input_ids"]
    assert ids[0] == 101 and ids[-2:] == [1012, 102] and 100 not in ids  # no [UNK]


def test_select_boxes_thresholds_scaling_and_order():
    # One image, caption "[CLS] dog . [SEP]" (ids 101, 7, 1012, 102), 4 queries, max_text_len 6.
    ids = torch.tensor([[101, 7, 1012, 102]])
    attn = torch.ones_like(ids)
    delim = torch.tensor([0, 100, 101, 102, 103, 1012, 1029])
    p = torch.full((1, 4, 6), 0.01)
    p[0, 0, 1] = 0.5  # on "dog"
    p[0, 1, 1] = 0.9  # on "dog", best
    p[0, 2, 2] = 0.95  # only on "." : not grounded in the concept -> dropped
    p[0, 3, 1] = 0.2  # below the box threshold
    logits = torch.logit(p)
    cxcywh = torch.tensor(
        [[[0.5, 0.5, 0.5, 0.5], [0.25, 0.25, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [0.9, 0.9, 0.4, 0.4]]]
    )
    (boxes,) = select_boxes(logits, cxcywh, ids, attn, delim, (100, 200), 0.3, 0.25)
    assert boxes.dtype == np.float32
    np.testing.assert_allclose(boxes, [[0, 0, 100, 50], [50, 25, 150, 75]], atol=1e-4)  # xyxy, best first
    # Strict thresholds: 1.0 keeps nothing, text threshold above every concept token keeps nothing.
    assert len(select_boxes(logits, cxcywh, ids, attn, delim, (100, 200), 1.0, 0.0)[0]) == 0
    assert len(select_boxes(logits, cxcywh, ids, attn, delim, (100, 200), 0.0, 0.9)[0]) == 0
    # Box threshold 0 keeps every box grounded in the concept; the out-of-image part is clipped.
    (all_boxes,) = select_boxes(logits, cxcywh, ids, attn, delim, (100, 200), 0.0, 0.1)
    assert len(all_boxes) == 3 and all_boxes[:, 2].max() <= 200 and all_boxes[:, 3].max() <= 100


def test_sam_model_type_from_shapes_or_file_name():
    assert sam_model_type({PATCH_KEY: torch.empty(768, 3, 16, 16)}, "x.pth") == "vit_b"
    assert sam_model_type({PATCH_KEY: torch.empty(1280, 3, 16, 16)}, "sam_vit_b.pth") == "vit_h"  # shapes win
    assert sam_model_type({PATCH_KEY: torch.empty(32, 3, 8, 8)}, "x.pth") == "tiny"
    assert sam_model_type({}, "/ckpt/sam_vit_l_0b3195.pth") == "vit_l"
    with pytest.raises(ModelLoadError, match="x.pth"):
        sam_model_type({}, "x.pth")
    with pytest.raises(ModelLoadError, match="width 999"):
        sam_model_type({PATCH_KEY: torch.empty(999, 3, 16, 16)}, "x.pth")


# ---------------------------------------------------------------- concept job


def test_concept_job_mask_notes(tiny_pipe, sam_pth):
    w = get_attn2_weights(tiny_pipe.unet)
    ims = images(n=2)
    style = Concept("Van Gogh", ConceptType.STYLE, "art")
    obj = Concept("airplane", ConceptType.OBJECT, "sky")

    def worker(m):
        return ConceptBatchWorker(tiny_pipe, EraseSettings(), CPU, w, w, masker=m)

    none = worker(None)
    for c, source in ((style, "whole-image (style)"), (obj, "whole-image")):
        masks, notes = none.masks(c, ims)
        assert masks.all() and notes["mask_source"] == source and notes["whole_image_fallbacks"] == 0

    found = worker(masker("grounded-sam", sam_pth, 0.0, 0.0))
    masks, notes = found.masks(obj, ims)
    assert notes["mask_source"] == "grounded-sam" and notes["whole_image_fallbacks"] == 0
    assert min(notes["boxes"]) >= 2 and masks.shape == (2, 40, 48)
    # Styles never go through the detector, even with a masker.
    assert found.masks(style, ims)[1]["mask_source"] == "whole-image (style)"

    nothing = worker(masker("segment-anything", sam_pth, 1.0, 1.0))
    masks, notes = nothing.masks(obj, ims)
    assert masks.all() and notes["mask_source"] == "segment-anything"
    assert notes["whole_image_fallbacks"] == 2 and notes["boxes"] == [0, 0]


# ---------------------------------------------------------------- storage pairing


def test_images_and_masks_pair_by_index_whatever_the_write_order(tmp_path):
    from mace_ray.erase.artefacts import read_images
    from mace_ray.erase.layout import DataLayout
    from mace_ray.storage.local import LocalStorage

    n = 6
    rng = np.random.default_rng(3)
    ims = rng.integers(0, 256, (n, 24, 20, 3), dtype=np.uint8)
    # Each mask is a function of its image, and distinct per index: a mix-up cannot go unseen.
    masks = np.stack([im[..., 0] > np.median(im[..., 0]) for im in ims])
    assert len({m.tobytes() for m in masks}) == n

    class ShuffledListing(LocalStorage):
        """Lists keys in a random order, like an object store that promises no order."""

        def list(self, prefix: str) -> list[str]:
            keys = super().list(prefix)
            random.Random(len(keys)).shuffle(keys)
            return keys

    storage, where = ShuffledListing(tmp_path / "out"), DataLayout("0123456789abcdef01234567")
    writes = [("image", i) for i in range(n)] + [("mask", i) for i in range(n)]
    random.Random(7).shuffle(writes)
    for kind, i in writes:
        key = where.image(i) if kind == "image" else where.mask(i)
        storage.write_bytes(key, png_bytes(ims[i] if kind == "image" else masks[i]))
    assert len(storage.list(where.root)) == 2 * n
    got = read_images(storage, where, n)
    assert got is not None
    got_ims, got_masks = got
    assert np.array_equal(got_ims, ims) and np.array_equal(got_masks, masks)
    for im, m in zip(got_ims, got_masks, strict=True):
        assert np.array_equal(m, im[..., 0] > np.median(im[..., 0]))
    # A missing mask means "not stored", never a shifted pairing.
    (tmp_path / "out" / where.mask(2)).unlink()
    assert read_images(storage, where, n) is None


# ---------------------------------------------------------------- bad input


def test_missing_or_corrupt_checkpoint_names_the_path(tmp_path):
    missing = tmp_path / "nope" / "sam_vit_h.pth"
    corrupt = tmp_path / "sam_vit_b_truncated.pth"
    torch.save(tiny_segment_anything_sam().state_dict(), corrupt)
    corrupt.write_bytes(corrupt.read_bytes()[:5000])  # an interrupted download
    not_a_state_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], not_a_state_dict)
    wrong = tmp_path / "broken_tiny.pth"
    state = tiny_segment_anything_sam().state_dict()
    del state["mask_decoder.iou_token.weight"]
    torch.save(state, wrong)
    for path, why in (
        (missing, "no such file"),
        (corrupt, "cannot be read"),
        (not_a_state_dict, "expected a state dict"),
        (wrong, "does not fit SAM tiny"),
    ):
        settings = MaskSettings("segment-anything", None, str(path))
        with pytest.raises(ModelLoadError, match=why) as e:
            load_masker(settings, CPU, tiny=True)
        msg = str(e.value)
        assert str(path) in msg and "\n" not in msg and isinstance(e.value, MaceError)


def test_missing_folder_and_offline_hub_id_are_named(tmp_path, monkeypatch):
    folder = str(tmp_path / "no-such-detector")
    with pytest.raises(ModelLoadError, match="no such folder") as e:
        load_masker(MaskSettings("grounded-sam", folder, "tiny"), CPU)
    assert folder in str(e.value)
    # Offline mode: the hub is not even tried, so this fails at once instead of retrying.
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="'facebook/sam-vit-nonexistent'") as e:
        load_masker(MaskSettings("grounded-sam", "tiny", "facebook/sam-vit-nonexistent"), CPU)
    assert "\n" not in str(e.value)
    with pytest.raises(ModelLoadError, match="segment-anything masker"):
        load_masker(MaskSettings("grounded-sam", "tiny", str(tmp_path / "sam_vit_h.pth")), CPU)


def test_unknown_masker_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown masker 'sam2'") as e:
        MaskSettings(masker="sam2")
    assert all(name in str(e.value) for name in MASKERS)
    with pytest.raises(MaskerError, match="unknown masker 'sam2'") as e:
        check_masker("sam2")
    assert all(name in str(e.value) for name in MASKERS)


def test_segment_anything_needs_a_checkpoint_unless_tiny():
    with pytest.raises(MaskerError, match=r"\.pth"):
        load_masker(MaskSettings(masker="segment-anything"), CPU)
    assert load_masker(MaskSettings(masker="segment-anything"), CPU, tiny=True).name == "segment-anything"


def test_bad_images_are_rejected():
    m = WholeImageMasker()
    with pytest.raises(MaskerError, match="uint8"):
        m(np.zeros((1, 8, 8, 3), dtype=np.float32), "dog")
    with pytest.raises(MaskerError, match=r"\(N, H, W, 3\)"):
        m(np.zeros((8, 8, 3), dtype=np.uint8), "dog")
