"""The evaluation formulas (MACE Sec. 4) on hand-made inputs; suites, seeds and prompt CSVs."""

from __future__ import annotations

import math

import pytest
import torch

from mace_core.evaluation.errors import EvalInputError
from mace_core.evaluation.fid import FeatureMoments, fid, frechet_distance
from mace_core.evaluation.metrics import (
    accuracy,
    clip_scores,
    exposed_counts,
    harmonic_celebrities,
    harmonic_objects,
    style_gap,
    zero_shot_predict,
)
from mace_core.evaluation.prompt_csv import read_coco_csv, read_i2p_csv
from mace_core.evaluation.scoring import ImageScore, summarise
from mace_core.evaluation.suites import (
    CIFAR10_CLASSES,
    OBJECT_SYNONYMS,
    celebrities_suite,
    explicit_suite,
    objects_suite,
)

# ------------------------------------------------------------------ harmonic means


def test_harmonic_means_reproduce_the_papers_numbers():
    # Paper, celebrities (100 erased): Acc_e 4.31, Acc_s 84.56 -> H_c 89.78.
    assert 100 * harmonic_celebrities(0.0431, 0.8456) == pytest.approx(89.78, abs=0.01)
    # Paper, objects (means of 10 classes): 8.49 / 97.35 / 10.53; the paper's H_o 92.61 is the
    # mean of per-class H_o, so the H_o of the mean accuracies is close but not equal.
    h = harmonic_objects(0.0849, 0.9735, 0.1053)
    assert h == pytest.approx(3 / (1 / 0.9151 + 1 / 0.9735 + 1 / 0.8947), rel=1e-12)
    assert 100 * h == pytest.approx(92.61, abs=0.1)
    # Paper, styles: CLIP_e 22.59, CLIP_s 28.58 -> H_a 5.99.
    assert style_gap(22.59, 28.58) == pytest.approx(5.99)


def test_harmonic_means_limits():
    assert harmonic_objects(0.0, 1.0, 0.0) == pytest.approx(1.0)
    assert harmonic_celebrities(0.0, 1.0) == pytest.approx(1.0)
    # Any term at 0 (erased concept still always generated, or nothing retained) gives 0.
    assert harmonic_objects(1.0, 1.0, 0.0) == 0.0
    assert harmonic_objects(0.0, 0.0, 0.0) == 0.0
    assert harmonic_celebrities(0.2, 0.0) == 0.0
    # Equal terms: the harmonic mean is that term.
    assert harmonic_objects(0.4, 0.6, 0.4) == pytest.approx(0.6)


# ------------------------------------------------------------------ CLIP metrics


def test_zero_shot_accuracy_on_constructed_embeddings():
    g = torch.Generator().manual_seed(0)
    classes = torch.eye(10, 16)  # one orthogonal text embedding per class
    truth = torch.arange(40) % 10
    # Each image near its class's text, at a different scale (cosine ignores scale).
    images = (classes[truth] + 0.1 * torch.randn(40, 16, generator=g)) * torch.rand(40, 1, generator=g).add(
        0.5
    )
    wrong = truth.clone()
    wrong[:7] = (truth[:7] + 1) % 10
    images[:7] = classes[wrong[:7]] * 3.0  # 7 images look like another class
    pred = zero_shot_predict(images, classes)
    assert torch.equal(pred, wrong)
    names = [CIFAR10_CLASSES[i] for i in pred.tolist()]
    assert accuracy(names, [CIFAR10_CLASSES[i] for i in truth.tolist()]) == pytest.approx(33 / 40)
    assert accuracy([], []) is None


def test_clip_score_is_100_cosine_clipped_at_zero():
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [3.0, 4.0]])
    txt = torch.tensor([[2.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [4.0, 3.0]])
    s = clip_scores(img, txt)
    assert s.tolist() == pytest.approx([100.0, 0.0, 0.0, 100 * 24 / 25])


def test_exposed_counts_threshold():
    dets = [
        [{"class": "FEET_EXPOSED", "score": 0.9}, {"class": "FEET_EXPOSED", "score": 0.61}],
        [{"class": "FEET_EXPOSED", "score": 0.6}, {"class": "FACE_FEMALE", "score": 0.99}],
        [{"class": "BELLY_EXPOSED", "score": 0.7}, {"class": "BELLY_COVERED", "score": 0.9}],
    ]
    counts = exposed_counts(dets)
    assert counts["FEET_EXPOSED"] == 2 and counts["BELLY_EXPOSED"] == 1  # 0.6 itself is not "above"
    assert sum(counts.values()) == 3 and "FACE_FEMALE" not in counts


# ------------------------------------------------------------------ FID


def test_fid_of_identical_sets_is_zero_and_of_shifted_sets_is_the_shift():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 8, generator=g, dtype=torch.float64) @ torch.randn(
        8, 8, generator=g, dtype=torch.float64
    )
    a = FeatureMoments.from_features(x)
    assert fid(a, FeatureMoments.from_features(x.clone())) == pytest.approx(0.0, abs=1e-8)
    # Same covariance, mean shifted by c: FID = ||c||^2 exactly.
    c = torch.arange(8, dtype=torch.float64) / 4
    assert fid(a, FeatureMoments.from_features(x + c)) == pytest.approx(float(c @ c), rel=1e-9)


def test_frechet_distance_closed_forms():
    # Diagonal Gaussians: ||mu1 - mu2||^2 + sum (sqrt(a) - sqrt(b))^2.
    a, b = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 1.0, 0.25])
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    want = (
        1 + 4 + sum((math.sqrt(x) - math.sqrt(y)) ** 2 for x, y in zip(a.tolist(), b.tolist(), strict=True))
    )
    assert frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b)) == pytest.approx(want, rel=1e-12)
    # Isotropic covariances s1^2 I, s2^2 I in d dims: d (s1 - s2)^2.
    d = 5
    got = frechet_distance(torch.zeros(d), 4 * torch.eye(d), torch.zeros(d), 9 * torch.eye(d))
    assert got == pytest.approx(d * (2 - 3) ** 2)


def test_frechet_distance_matches_scipy_sqrtm_for_non_commuting_covariances():
    from pytorch_fid.fid_score import calculate_frechet_distance  # scipy.linalg.sqrtm reference

    g = torch.Generator().manual_seed(2)
    A, B = (
        torch.randn(6, 6, generator=g, dtype=torch.float64),
        torch.randn(6, 6, generator=g, dtype=torch.float64),
    )
    s1, s2 = A @ A.T + 0.1 * torch.eye(6), B @ B.T + 0.1 * torch.eye(6)
    mu1, mu2 = (
        torch.randn(6, generator=g, dtype=torch.float64),
        torch.randn(6, generator=g, dtype=torch.float64),
    )
    want = calculate_frechet_distance(mu1.numpy(), s1.numpy(), mu2.numpy(), s2.numpy())
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(float(want), rel=1e-7)


def test_feature_moments_merge_exactly_in_any_order():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(50, 4, generator=g, dtype=torch.float64) * 10 + 100  # large offset: centred sums
    whole = FeatureMoments.from_features(x)
    parts = [FeatureMoments.from_features(x[i : i + 7]) for i in range(0, 50, 7)]
    merged = parts[0]
    for p in parts[1:]:
        merged = merged + p
    reverse = parts[-1]
    for p in reversed(parts[:-1]):
        reverse = p + reverse
    for m in (merged, reverse):
        assert m.n == 50
        assert torch.allclose(m.mean, whole.mean, atol=1e-10)
        assert torch.allclose(m.covariance(), torch.cov(x.T), atol=1e-9)


# ------------------------------------------------------------------ summaries of hand-made scores


def test_summarise_objects_and_celebrities():
    def s(group, subject, label, pred):
        return ImageScore(id=f"{subject}-{pred}", group=group, subject=subject, label=label, predicted=pred)

    scores = [
        s("erased", "dog", "dog", "dog"),
        s("erased", "dog", "dog", "cat"),
        s("erased", "dog", "dog", "frog"),
        s("erased", "dog", "dog", "ship"),
        s("retained", "cat", "cat", "cat"),
        s("retained", "ship", "ship", "truck"),
        s("synonym", "puppy", "dog", "dog"),
        s("synonym", "hound", "dog", "horse"),
    ]
    m = summarise("objects", scores)["metrics"]
    assert (m["acc_e"], m["acc_s"], m["acc_g"]) == (25.0, 50.0, 50.0)
    assert m["h_o"] == pytest.approx(100 * harmonic_objects(0.25, 0.5, 0.5))
    c = summarise("celebrities", [x for x in scores if x.group != "synonym"])
    assert c["metrics"]["h_c"] == pytest.approx(100 * harmonic_celebrities(0.25, 0.5))
    assert c["per_subject"]["dog"] == {"group": "erased", "images": 4, "value": 25.0}


def test_summarise_styles_explicit_and_coco():
    st = [
        ImageScore("a", "erased", "X", "X", clip=20.0),
        ImageScore("b", "erased", "X", "X", clip=24.0),
        ImageScore("c", "retained", "Y", "Y", clip=30.0),
    ]
    m = summarise("styles", st)["metrics"]
    assert (m["clip_e"], m["clip_s"], m["h_a"]) == (22.0, 30.0, 8.0)
    ex = [
        ImageScore("a", "prompted", "", "", exposed={"FEET_EXPOSED": 2}),
        ImageScore("b", "prompted", "", "", exposed={}),
        ImageScore("c", "prompted", "", "", exposed={"FEET_EXPOSED": 1, "BELLY_EXPOSED": 1}),
    ]
    e = summarise("explicit", ex)["metrics"]
    assert e["exposed"]["FEET_EXPOSED"] == 3 and e["total"] == 4 and e["images_with_exposed"] == 2
    x = torch.randn(20, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    co = summarise(
        "coco",
        [ImageScore("a", "prompted", "", "", clip=31.0), ImageScore("b", "prompted", "", "", clip=29.0)],
        FeatureMoments.from_features(x),
        FeatureMoments.from_features(x + 1.0),
        "clip",
    )["metrics"]
    assert co["clip"] == 30.0 and co["fid"] == pytest.approx(3.0) and co["fid_reference_images"] == 20


# ------------------------------------------------------------------ suites and seeds


def test_objects_suite_has_every_class_and_the_erased_synonyms():
    suite = objects_suite(["dog"], images_per_prompt=3)
    subjects = {p.subject for p in suite.prompts}
    assert subjects == set(CIFAR10_CLASSES) | set(OBJECT_SYNONYMS["dog"])
    assert len(suite.prompts) == 3 * 13
    syn = [p for p in suite.prompts if p.group == "synonym"]
    assert {p.label for p in syn} == {"dog"} and syn[0].prompt.startswith("a photo of the ")
    assert len({p.id for p in suite.prompts}) == len(suite.prompts)
    # Seeds are fixed: the same suite again, or with another class erased, has the same seeds.
    again = objects_suite(["dog"], images_per_prompt=3)
    other = {(p.prompt, p.seed) for p in objects_suite(["cat"], images_per_prompt=3).prompts}
    assert [p.seed for p in again.prompts] == [p.seed for p in suite.prompts]
    assert {(p.prompt, p.seed) for p in suite.prompts if p.subject == "truck"} <= other
    with pytest.raises(EvalInputError, match="'spaceship' is not a CIFAR-10 class"):
        objects_suite(["spaceship"], 1)


def test_explicit_seeds_and_named_suites():
    suite = celebrities_suite(["Bill Clinton"], ["Bill Murray"], 2, seeds=(7, 8))
    assert {p.seed for p in suite.prompts} == {7, 8}
    assert len(suite.prompts) == 2 * 5 * 2 and suite.classes == ("Bill Clinton", "Bill Murray")
    with pytest.raises(EvalInputError, match="both erased and retained"):
        celebrities_suite(["A B"], ["a b"], 1)


def test_i2p_csv_uses_its_seeds_guidance_and_size(tmp_path):
    f = tmp_path / "i2p.csv"
    f.write_text(
        "prompt,categories,sd_seed,sd_guidance_scale,sd_image_width,sd_image_height,extra\n"
        '"a ""quoted, with comma"" prompt",sexual,42,7,512,512,x\n'
        ",hate,1,7,512,512,x\n"
        "second prompt,violence,,,,,x\n"
    )
    rows, skipped = read_i2p_csv(f)
    assert skipped == 1 and [r.text for r in rows] == ['a "quoted, with comma" prompt', "second prompt"]
    suite = explicit_suite(rows, skipped, images_per_prompt=2)
    first = [p for p in suite.prompts if p.prompt.startswith("a ")]
    assert [p.seed for p in first] == [42, 43]  # image 0 is the dataset's published seed
    assert first[0].guidance == 7.0 and first[0].width == 512 and first[0].info == "sexual"
    second = [p for p in suite.prompts if p.prompt == "second prompt"]
    assert second[0].guidance is None and second[0].seed not in (42, 43)
    assert suite.notes == ("1 row(s) with an empty prompt skipped",)
    assert len(explicit_suite(rows, 0, 1, limit=1).prompts) == 1


def test_prompt_csv_errors_name_the_file_and_columns(tmp_path):
    f = tmp_path / "bad.csv"
    f.write_text("text,seed\nhello,1\n")
    with pytest.raises(EvalInputError) as e:
        read_i2p_csv(f)
    msg = str(e.value)
    assert "bad.csv" in msg and "lacks column(s) prompt" in msg and "found: text, seed" in msg
    assert "\n" not in msg
    with pytest.raises(EvalInputError, match="lacks column"):
        read_coco_csv(f)
    with pytest.raises(EvalInputError, match="does not exist"):
        read_coco_csv(tmp_path / "missing.csv")
    g = tmp_path / "seeds.csv"
    g.write_text("prompt,sd_seed\nhi,abc\n")
    with pytest.raises(EvalInputError, match=r"seeds.csv:2: column 'sd_seed' is not an integer"):
        read_i2p_csv(g)
    for width in ("-5", "0", "500"):  # refused at the file's line, before any worker starts
        g.write_text(f"prompt,sd_image_width\nhi,512\nho,{width}\n")
        with pytest.raises(EvalInputError, match=rf"seeds.csv:3: column 'sd_image_width' is {width}: an"):
            read_i2p_csv(g)
    for scale in ("-inf", "inf", "-1"):  # as --guidance-scale: finite and >= 0
        g.write_text(f"prompt,sd_guidance_scale\nhi,7.5\nho,{scale}\n")
        with pytest.raises(
            EvalInputError, match=r"seeds.csv:3: column 'sd_guidance_scale' is .*finite number >= 0"
        ):
            read_i2p_csv(g)
