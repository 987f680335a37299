"""The Grafana dashboard in cluster/grafana is a dashboard, and shows only what the code exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from mace_ray.engine.metrics import EXPORTED, METRICS

DASHBOARD = Path(__file__).resolve().parents[1] / "cluster" / "grafana" / "mace-ray.json"
PANEL_TYPES = {"stat", "timeseries", "bargauge", "gauge", "table", "text"}


def test_dashboard_is_a_grafana_dashboard():
    d = json.loads(DASHBOARD.read_text())
    assert isinstance(d["title"], str) and d["uid"] and isinstance(d["schemaVersion"], int)
    names = [v["name"] for v in d["templating"]["list"]]
    assert names == ["datasource", "run"]
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    for p in d["panels"]:
        assert p["type"] in PANEL_TYPES and p["title"]
        assert {k: type(v) for k, v in p["gridPos"].items()} == {"h": int, "w": int, "x": int, "y": int}
        assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24  # Grafana's grid is 24 wide
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs))
        assert all(t["datasource"]["uid"] == "${datasource}" and t["expr"] for t in p["targets"])


def test_dashboard_names_only_exported_metrics_and_all_of_them():
    d = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in d["panels"] for t in p["targets"]]
    exprs += [v["definition"] for v in d["templating"]["list"] if "definition" in v]
    used = {m for e in exprs for m in re.findall(r"\bray_mace_\w+", e)}
    assert used <= set(EXPORTED), used - set(EXPORTED)
    assert used == set(EXPORTED)  # every metric the code exports is on a panel
    assert set(EXPORTED) == {f"ray_{m}" for m in METRICS}


def test_throughput_is_shown_per_stage():
    """Each stage has its own kind of work (text statistics, images, training): one series
    over all of them would show whichever stage ran last."""
    d = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in d["panels"] for t in p["targets"] if "concepts_per_second" in t["expr"]]
    assert exprs and all(re.search(r"\bby \([^)]*\bstage\b", e) for e in exprs), exprs
    assert "per stage" in METRICS["mace_worker_concepts_per_second"]
