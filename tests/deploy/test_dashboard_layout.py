"""The Grafana dashboard file on its own (no Prometheus needed): panels are unique, tile the grid, show what we ship."""

from __future__ import annotations

import json
from pathlib import Path

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
