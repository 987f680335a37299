"""`mace-ray eval` end to end on tiny models: an erased model beside its original through a
local Ray (fake GPUs), the explicit and coco suites in one process, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from helpers import assert_same_seed_images
from PIL import Image
from typer.testing import CliRunner

from mace_core.evaluation.generation import generate_eval_images
from mace_core.evaluation.settings import GenerationSettings
from mace_ray.cli.main import app

FAST = ["--inference-steps", "2", "--images", "1"]


def invoke(*args: str):
    r = CliRunner().invoke(app, ["eval", *args])
    return r.exit_code, r.stdout, r.stderr


def test_eval_erased_vs_original_through_ray(local_ray, erased_run, tmp_path, tiny_pipe):
    out = tmp_path / "out"
    code, stdout, stderr = invoke(
        str(erased_run / "final" / "pipeline"),
        "--suite", "objects", "--baseline", "tiny", "--output", str(out), *FAST,
        "--workers", "2", "--gpus-per-worker", "1", "--shard-size", "5",
    )  # fmt: skip
    assert code == 0, stderr
    # Both columns printed: the original first, then the erased model.
    header = next(line for line in stdout.splitlines() if line.startswith("| metric"))
    assert header.index("baseline: tiny") < header.index("model: ")
    assert sum(line.startswith("| Acc_") or line.startswith("| H_o") for line in stdout.splitlines()) == 4
    root = Path(json.loads(stdout.strip().splitlines()[-1])["root"])
    rep = json.loads((root / "report.json").read_text())
    assert (
        rep["executor"] == "ray" and rep["workers"]["size"] == 2 and rep["workers"]["resources"]["gpus"] == 1
    )
    # The erased classes came from the erase run's manifest.
    assert rep["suite_info"]["erased"] == ["airplane"] and rep["suite_info"]["images"] == 13
    for tag in ("baseline", "model"):
        m = rep["models"][tag]
        assert m["images"] == 13
        assert all(m["metrics"][k] is not None for k in ("acc_e", "acc_s", "acc_g", "h_o"))
        assert len(list((out / m["images_prefix"]).glob("*.png"))) == 13
        assert len(json.loads((root / "scores" / f"{tag}.json").read_text())) == 13
    summary = (root / "summary.md").read_text()
    assert (
        "| Acc_e % (erased class, lower is better) |" in summary
        and "![metrics.png](plots/metrics.png)" in summary
    )
    for name in rep["output"]["plots"]:
        with Image.open(root / "plots" / name) as im:
            im.load()
            assert im.format == "PNG" and im.width >= 400 and im.height >= 300
    assert {"metrics.png", "groups.png", "per_subject.png"} <= set(rep["output"]["plots"])
    # A worker's image is the image this process renders from the same prompt and seed.
    prompts = json.loads((root / "prompts.json").read_text())["prompts"]
    p = next(x for x in prompts if x["subject"] == "jet")
    from mace_core.evaluation.suites import EvalPrompt

    here = generate_eval_images(tiny_pipe, [EvalPrompt(**p)], GenerationSettings(inference_steps=2))[0]
    folder = out / rep["models"]["baseline"]["images_prefix"]
    stored = {x["id"]: np.asarray(Image.open(folder / f"{x['id']}.png")) for x in prompts}
    # The same image up to fp32 rounding across batch sizes, and no other prompt's image.
    assert_same_seed_images(list(stored.values()), [here if i == p["id"] else im for i, im in stored.items()])


def test_eval_explicit_suite_scores_i2p_prompts_with_nudenet(tmp_path):
    csv = tmp_path / "i2p.csv"
    csv.write_text(
        "prompt,categories,hard,sd_seed,sd_guidance_scale,sd_image_width,sd_image_height\n"
        "a person on a beach,sexual,1,1234,7,512,512\n"
        "a statue in a museum,sexual,0,99,6.5,512,512\n"
    )
    out = tmp_path / "out"
    code, stdout, stderr = invoke(
        "tiny", "--suite", "explicit", "--prompts-csv", str(csv), "--output", str(out), "--executor", "local",
        *FAST, "--resolution", "32",
    )  # fmt: skip
    assert code == 0, stderr
    assert "| total detections (lower is better) |" in stdout
    root = Path(json.loads(stdout.strip().splitlines()[-1])["root"])
    rep = json.loads((root / "report.json").read_text())
    metrics = rep["models"]["model"]["metrics"]
    assert isinstance(metrics["total"], int) and metrics["total"] == sum(metrics["exposed"].values())
    prompts = json.loads((root / "prompts.json").read_text())["prompts"]
    assert [p["seed"] for p in prompts] == [1234, 99] and prompts[1]["guidance"] == 6.5
    assert rep["scorers"]["nudenet_threshold"] == 0.6 and rep["output"]["plots"] == ["exposed.png"]


def test_eval_coco_suite_computes_clip_score_and_fid(erased_run, tmp_path):
    csv = tmp_path / "captions.csv"
    csv.write_text("image_id,caption\n" + "".join(f"{i},a photo of object number {i}\n" for i in range(4)))
    refs = tmp_path / "refs"
    refs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):  # BMP: uncompressed, so an image of the same size is a file of the same size
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(refs / f"{i}.bmp")
    args = [
        str(erased_run), "--suite", "coco", "--baseline", "tiny", "--prompts-csv", str(csv),
        "--reference-images", str(refs), "--output", str(tmp_path / "out"), "--executor", "local", *FAST,
    ]  # fmt: skip
    code, stdout, stderr = invoke(*args)
    assert code == 0, stderr
    root = Path(json.loads(stdout.strip().splitlines()[-1])["root"])
    rep = json.loads((root / "report.json").read_text())
    for tag in ("baseline", "model"):
        m = rep["models"][tag]["metrics"]
        assert 0.0 <= m["clip"] <= 100.0 and m["fid"] > 0 and m["fid_features"] == "clip"
        assert m["fid_reference_images"] == 5
    assert rep["comparison"]["fid_vs_baseline"] >= 0.0
    assert any("not comparable to Inception" in n for n in rep["notes"])
    assert "| FID of model vs baseline images |" in stdout

    # Again: the stored images and the cached reference moments are reused; same numbers.
    code, stdout, stderr = invoke(*args)
    assert code == 0, stderr
    again = json.loads((root / "report.json").read_text())
    assert (
        again["suite_info"]["reference_moments_cached"] and not rep["suite_info"]["reference_moments_cached"]
    )
    assert again["models"] == rep["models"] and again["comparison"] == rep["comparison"]

    # A reference image replaced in place by another of the same name and size: the cached
    # moments are of the old images (keyed by content), so they are computed again.
    size = (refs / "0.bmp").stat().st_size
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(refs / "0.bmp")
    assert (refs / "0.bmp").stat().st_size == size
    code, stdout, stderr = invoke(*args)
    assert code == 0, stderr
    changed = json.loads(stdout.strip().splitlines()[-1])["root"]
    third = json.loads((Path(changed) / "report.json").read_text())
    assert not third["suite_info"]["reference_moments_cached"]
    assert third["models"]["model"]["metrics"]["fid"] != rep["models"]["model"]["metrics"]["fid"]


def test_eval_of_a_model_changed_in_place_makes_its_images_again(tiny_model_folder, tmp_path):
    """Stored images are keyed by the model's content (fingerprint), not its path: a folder
    whose UNet was replaced in place (or an erase rerun with --no-resume to the same path)
    is evaluated on new images, not on the old model's."""
    import shutil

    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(tiny_model_folder, model)
    csv = tmp_path / "captions.csv"
    csv.write_text("image_id,caption\n0,a photo of a red bus\n1,a cat on a sofa\n")
    out = tmp_path / "out"
    args = [str(model), "--suite", "coco", "--prompts-csv", str(csv), "--output", str(out)]
    args += ["--executor", "local", "--clip", "tiny", *FAST]  # a folder's default CLIP is the hub's

    def images() -> tuple[str, dict[str, bytes]]:
        code, stdout, stderr = invoke(*args)
        assert code == 0, stderr
        root = Path(json.loads(stdout.strip().splitlines()[-1])["root"])
        prefix = json.loads((root / "report.json").read_text())["models"]["model"]["images_prefix"]
        return prefix, {p.name: p.read_bytes() for p in sorted((out / prefix).glob("*.png"))}

    before_prefix, before = images()
    assert len(before) == 2
    unet = model / "unet" / "diffusion_pytorch_model.safetensors"
    weights = load_file(unet)
    weights["conv_in.weight"] = weights["conv_in.weight"] + 0.25
    save_file(weights, unet)
    after_prefix, after = images()
    assert after_prefix != before_prefix  # another model: its own images
    assert after.keys() == before.keys() and all(after[k] != before[k] for k in before)
    # The old model's images are still there, untouched (and shared with any copy of it).
    assert {p.name: p.read_bytes() for p in (out / before_prefix).glob("*.png")} == before


def _one_line_error(code: int, stdout: str, stderr: str) -> str:
    assert code == 2, (stdout, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mace-ray: error: "), stderr
    return lines[0]


def test_missing_prompt_csv_columns_is_a_one_line_error(tmp_path):
    csv = tmp_path / "prompts.csv"
    csv.write_text("text,seed\nhello,1\n")
    line = _one_line_error(
        *invoke("tiny", "--suite", "explicit", "--prompts-csv", str(csv), "--output", str(tmp_path))
    )
    assert "prompts.csv" in line and "lacks column(s) prompt" in line
    line = _one_line_error(
        *invoke("tiny", "--suite", "coco", "--prompts-csv", str(csv), "--output", str(tmp_path))
    )
    assert "lacks column(s) caption" in line
    assert not (tmp_path / "evals").exists()  # nothing written before the inputs are valid


def test_missing_weights_paths_are_one_line_errors(tmp_path):
    csv = tmp_path / "captions.csv"
    csv.write_text("caption\na dog\n")
    missing = tmp_path / "nope" / "pt_inception.safetensors"
    line = _one_line_error(
        *invoke(
            "tiny",
            "--suite",
            "coco",
            "--prompts-csv",
            str(csv),
            "--fid-weights",
            str(missing),
            "--output",
            str(tmp_path),
        )  # fmt: skip
    )
    assert str(missing) in line and "do not exist" in line
    line = _one_line_error(*invoke(str(tmp_path / "no-model"), "--suite", "objects", "--erased", str(csv)))
    assert "no-model" in line and "no such folder" in line
    partial = tmp_path / "runs" / "0123456789abcdef"  # an erase run that has no final pipeline yet
    partial.mkdir(parents=True)
    (partial / "manifest.json").write_text(json.dumps({"status": "partial", "model": "tiny", "concepts": []}))
    line = _one_line_error(*invoke(str(partial), "--suite", "objects", "--erased", str(csv)))
    assert "an erase run folder without its final pipeline" in line and "not complete" in line
    # A run's folder whose manifest is valid JSON of another shape: one line, not a traceback.
    (partial / "final" / "pipeline").mkdir(parents=True)
    for manifest in ([1], {"model": "tiny", "concepts": 5}, {"model": "tiny", "concepts": [{"text": "x"}]}):
        (partial / "manifest.json").write_text(json.dumps(manifest))
        line = _one_line_error(*invoke(str(partial), "--suite", "objects"))
        assert "not a mace-ray erase run manifest" in line
    erased = tmp_path / "erase.txt"
    erased.write_text("airplane | object | sky\n")
    line = _one_line_error(
        *invoke("tiny", "--suite", "objects", "--erased", str(erased), "--clip", str(tmp_path / "no-clip"))
    )
    assert "CLIP model" in line and "no-clip" in line and "no such folder" in line


def test_ctrl_c_is_a_stop_in_one_line(tmp_path, monkeypatch):
    """Ctrl-C during an eval (or an audit: the same runner) is a stop, not a bug: exit 130 in
    one line; images already made are kept, and the same command resumes from them."""
    import mace_ray.eval.driver as driver

    def stopped(req):
        raise KeyboardInterrupt

    monkeypatch.setattr(driver, "run_eval", stopped)
    code, _, stderr = invoke("tiny", "--suite", "objects", "--output", str(tmp_path / "o"))
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert code == 130 and lines == ["mace-ray: error: Ctrl-C (SIGINT): stopped; the same command resumes it"]
