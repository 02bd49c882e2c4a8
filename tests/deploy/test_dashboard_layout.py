"""The Grafana dashboard file on its own (no Prometheus needed): panels are unique, tile the grid, show what we ship."""

from __future__ import annotations

import json
import re
from pathlib import Path

from server.metrics import Metrics

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dashboards" / "loraplex.json"


def _panels() -> list[dict]:
    return json.loads(DASHBOARD.read_text())["panels"]


def test_panels_have_unique_ids_and_do_not_overlap() -> None:
    panels = _panels()
    assert len({panel["id"] for panel in panels}) == len(panels)
    cells = [
        (x, y)
        for panel in panels
        for x in range(panel["gridPos"]["x"], panel["gridPos"]["x"] + panel["gridPos"]["w"])
        for y in range(panel["gridPos"]["y"], panel["gridPos"]["y"] + panel["gridPos"]["h"])
    ]
    assert len(cells) == len(set(cells))
    assert all(x < 24 for x, _ in cells)


def test_prefix_cache_hit_rate_is_hits_over_queries_per_adapter() -> None:
    (panel,) = [panel for panel in _panels() if "hit rate" in panel["title"].lower()]
    assert panel["fieldConfig"]["defaults"]["unit"] == "percentunit"
    per_adapter = panel["targets"][0]["expr"]
    hits, queries = per_adapter.split(" / ")
    assert "loraplex_prefix_cache_hits_total" in hits and "by (adapter)" in hits
    assert "loraplex_prefix_cache_queries_total" in queries and "by (adapter)" in queries


def test_the_adapter_tier_row_reads_metrics_the_server_exposes() -> None:
    panels = _panels()
    (row,) = [panel for panel in panels if panel["type"] == "row" and "tier" in panel["title"].lower()]
    below = [p for p in panels if p["gridPos"]["y"] > row["gridPos"]["y"]]
    names = {m for panel in below for t in panel["targets"] for m in re.findall(r"loraplex_\w+", t["expr"])}
    assert {"loraplex_adapter_loads_total", "loraplex_adapter_prefetch_hits_total"} <= names
    exposed = Metrics(10, 4).render().decode()
    for name in names:
        assert f"\n{name}" in exposed, f"the dashboard reads {name}, which the server does not expose"
