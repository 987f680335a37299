"""PNG bar charts of an evaluation report (matplotlib, Agg canvas: headless, no global state).

``report_plots`` returns ``{file name: PNG bytes}``: the headline metrics per model, the
erased vs retained (and synonym) means per model, and per-subject bars.
"""

from __future__ import annotations

import io
from typing import Any

from mace_core.evaluation.summary import METRIC_ROWS, columns, metric_value

MAX_SUBJECTS = 60  # more bars than this are unreadable; report.json has them all
COLOURS = {"baseline": "#8c8c8c", "model": "#1f77b4"}


def bar_chart(title: str, ylabel: str, categories: list[str], series: dict[str, list[float | None]]) -> bytes:
    """Grouped bars: one group per category, one bar per series (None: no bar)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = max(1, len(series))
    width = min(30.0, max(6.0, 0.3 * len(categories) * n + 2.5))
    fig = Figure(figsize=(width, 4.5), dpi=100)
    FigureCanvasAgg(fig)  # a private canvas: pyplot's global backend is never touched
    ax = fig.add_subplot(1, 1, 1)
    bar = 0.8 / n
    for j, (name, values) in enumerate(series.items()):
        xs = [i + (j - (n - 1) / 2) * bar for i, v in enumerate(values) if v is not None]
        ys = [v for v in values if v is not None]
        bars = ax.bar(xs, ys, width=bar, label=name, color=COLOURS.get(name.split(":")[0]))
        if len(categories) * n <= 40:  # values on the bars (a 0 bar is otherwise invisible)
            ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(range(len(categories)))
    ax.set_xticklabels(
        categories, rotation=45 if len(categories) > 6 else 0, ha="right" if len(categories) > 6 else "center"
    )
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    values = [v for vs in series.values() for v in vs if v is not None]
    top, bottom = max(values + [1.0]), min(values + [0.0])  # H_a can be negative
    ax.set_ylim(bottom * 1.3, top * 1.3)  # room for the legend above the bars
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _legend(report: dict[str, Any], tag: str) -> str:
    return f"{tag}: {report['models'][tag]['name']}"[:60]


def report_plots(report: dict[str, Any]) -> dict[str, bytes]:
    suite, tags = report["suite"], columns(report)
    models = report["models"]
    plots: dict[str, bytes] = {}
    rows = [r for r in METRIC_ROWS[suite] if r[0] not in ("total", "images_with_exposed")]
    if suite == "explicit":
        cats = [label.replace("_EXPOSED", "").lower() for _, label, _ in rows]
        series = {
            _legend(report, t): [metric_value(models[t]["metrics"], k) for k, _, _ in rows] for t in tags
        }
        plots["exposed.png"] = bar_chart(
            "NudeNet detections (score > 0.6) per exposed class", "detections", cats, series
        )
        return plots
    cats = [label.split(" (")[0] for _, label, _ in rows]
    series = {_legend(report, t): [metric_value(models[t]["metrics"], k) for k, _, _ in rows] for t in tags}
    plots["metrics.png"] = bar_chart(f"{suite}: metrics per model", "value", cats, series)
    first = models[tags[0]]["per_subject"]
    if not first:
        return plots
    unit = "mean CLIP score" if suite == "styles" else "accuracy %"
    groups = [g for g in ("erased", "synonym", "retained") if any(s["group"] == g for s in first.values())]

    def group_mean(tag: str, group: str) -> float | None:
        vals = [
            s["value"]
            for s in models[tag]["per_subject"].values()
            if s["group"] == group and s["value"] is not None
        ]
        return sum(vals) / len(vals) if vals else None

    plots["groups.png"] = bar_chart(
        f"{suite}: erased vs retained ({unit}, mean over subjects)",
        unit,
        groups,
        {_legend(report, t): [group_mean(t, g) for g in groups] for t in tags},
    )
    # Suite order within each group, erased first; with many subjects an equal share per group.
    by_group = [[s for s in first if first[s]["group"] == g] for g in groups]
    share = MAX_SUBJECTS // len(by_group)
    shown = [s for subjects in by_group for s in subjects[:share]]
    more = f" ({len(shown)} of {len(first)}, first of each group)" if len(shown) < len(first) else ""
    plots["per_subject.png"] = bar_chart(
        f"{suite}: {unit} per subject{more}",
        unit,
        [f"{s} ({first[s]['group'][0]})" for s in shown],
        {_legend(report, t): [models[t]["per_subject"].get(s, {}).get("value") for s in shown] for t in tags},
    )
    return plots
