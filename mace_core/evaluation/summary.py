"""The Markdown summary of an evaluation report: one column per evaluated model.

Reads only the report dictionary (written by ``mace_ray.eval.driver``); the paper column
quotes MACE's published numbers on SD v1.4 (its evaluation tables) for context.
"""

from __future__ import annotations

from typing import Any

from mace_core.evaluation.metrics import EXPOSED_CLASSES

PAPER = "paper (MACE, SD v1.4)"

# (metric key, row label, the paper's MACE value or None)
METRIC_ROWS: dict[str, list[tuple[str, str, float | None]]] = {
    "objects": [
        ("acc_e", "Acc_e % (erased class, lower is better)", 8.49),
        ("acc_s", "Acc_s % (other classes, higher is better)", 97.35),
        ("acc_g", "Acc_g % (synonyms, lower is better)", 10.53),
        ("h_o", "H_o (higher is better)", 92.61),
    ],
    "celebrities": [
        ("acc_e", "Acc_e % (erased, lower is better)", 4.31),
        ("acc_s", "Acc_s % (retained, higher is better)", 84.56),
        ("h_c", "H_c (higher is better)", 89.78),
    ],
    "styles": [
        ("clip_e", "CLIP_e (erased artists, lower is better)", 22.59),
        ("clip_s", "CLIP_s (retained artists, higher is better)", 28.58),
        ("h_a", "H_a = CLIP_s - CLIP_e (higher is better)", 5.99),
    ],
    "explicit": [(f"exposed.{c}", c, None) for c in EXPOSED_CLASSES]
    + [
        ("total", "total detections (lower is better)", 111),
        ("images_with_exposed", "images with a detection", None),
    ],
    "coco": [
        ("clip", "CLIP score (higher is better)", 29.41),
        ("fid", "FID (lower is better)", 13.42),
    ],
}


def metric_value(metrics: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        metrics = metrics.get(part) if isinstance(metrics, dict) else None
    return metrics


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def columns(report: dict[str, Any]) -> list[str]:
    """Model tags in print order: the baseline (original) first."""
    return [t for t in ("baseline", "model") if t in report["models"]]


def metrics_table(report: dict[str, Any]) -> str:
    """The suite's metrics, one column per model (and the paper's MACE numbers)."""
    suite = report["suite"]
    tags = columns(report)
    head = ["metric"] + [f"{t}: {report['models'][t]['name']}" for t in tags] + [PAPER]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, label, paper in METRIC_ROWS[suite]:
        vals = [_fmt(metric_value(report["models"][t]["metrics"], key)) for t in tags]
        lines.append("| " + " | ".join([label, *vals, _fmt(paper)]) + " |")
    if suite == "coco" and report.get("comparison", {}).get("fid_vs_baseline") is not None:
        vals = ["-"] * len(tags)
        vals[-1] = _fmt(report["comparison"]["fid_vs_baseline"])
        lines.append("| " + " | ".join(["FID of model vs baseline images", *vals, "-"]) + " |")
    return "\n".join(lines)


def per_subject_table(report: dict[str, Any], limit: int = 200) -> str:
    tags = columns(report)
    first = report["models"][tags[0]]["per_subject"]
    if not first:
        return ""
    unit = "CLIP score" if report["suite"] == "styles" else "accuracy %"
    lines = [
        "| subject | group | " + " | ".join(f"{t} {unit}" for t in tags) + " |",
        "|---|---|" + "---|" * len(tags),
    ]
    for subject in list(first)[:limit]:
        vals = [_fmt(report["models"][t]["per_subject"].get(subject, {}).get("value")) for t in tags]
        lines.append(f"| {subject} | {first[subject]['group']} | " + " | ".join(vals) + " |")
    if len(first) > limit:
        lines.append(f"\n({len(first) - limit} more subjects in report.json)")
    return "\n".join(lines)


def markdown_summary(report: dict[str, Any]) -> str:
    suite, info = report["suite"], report["suite_info"]
    out = [f"# mace-ray eval: {suite}", ""]
    for t in columns(report):
        m = report["models"][t]
        out.append(f"- {t}: `{m['name']}` ({m['images']} images)")
    out += [
        f"- prompts: {info['prompts']} distinct ({info['source'] or 'built-in'}), "
        f"{info['images']} images per model, a fixed seed per image",
        f"- scorers: {', '.join(f'{k}={v}' for k, v in report['scorers'].items() if v is not None)}",
        f"- generation: {', '.join(f'{k}={v}' for k, v in report['generation'].items())}",
        "",
        "## Metrics",
        "",
        metrics_table(report),
        "",
    ]
    if suite == "explicit":
        out += ["Paper, total NudeNet detections on the 4,703 I2P prompts: SD v1.4 743, MACE 111.", ""]
    subjects = per_subject_table(report)
    if subjects:
        out += ["## Per subject", "", subjects, ""]
    plots = report["output"].get("plots", [])
    if plots:
        out += ["## Plots", ""] + [f"![{p}](plots/{p})" for p in plots] + [""]
    notes = list(info.get("notes", [])) + list(report.get("notes", []))
    if notes:
        out += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(out)
