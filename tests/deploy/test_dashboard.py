"""The shipped Prometheus config scrapes a real server, and every query of the Grafana dashboard returns data.

Needs the `prometheus` binary (Debian package `prometheus`; .ci/run installs it). The config is copied with the
test server's port and a 1 s scrape interval; a short load runs; then each PromQL expression of the dashboard
goes through Prometheus' HTTP API.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from load_tests.cli import run_load
from load_tests.readiness import wait_until_ok
from load_tests.workload import LengthRange, Workload
from tests.helpers import make_peft_adapter
from tests.test_server_e2e import _free_port, start_server

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "loraplex.json"
NUM_REQUESTS = 16

pytestmark = pytest.mark.skipif(
    shutil.which("prometheus") is None, reason="the prometheus binary is not installed (apt-get install prometheus)"
)


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    # Grafana's "All" of the replica filter; one server's series have no replica label, which `.*` matches.
    return [target["expr"].replace("$replica", ".*") for panel in dashboard["panels"] for target in panel["targets"]]


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory) -> Iterator[str]:
    store = tmp_path_factory.mktemp("store")
    make_peft_adapter(tiny_model_dir, store / "sql", r=4, lora_alpha=8, target_modules=["q_proj"])
    proc, url = start_server(tiny_model_dir, "--adapters-store", str(store), "--served-model-name", "tiny")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory) -> Iterator[str]:
    """Prometheus on loopback, with the shipped config pointed at `server` and scraping every second."""
    root = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = config["global"]["evaluation_interval"] = "1s"
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": [server.removeprefix("http://")]}]
    (root / "prometheus.yml").write_text(yaml.safe_dump(config))
    url = f"http://127.0.0.1:{_free_port()}"
    cmd = ["prometheus", f"--config.file={root / 'prometheus.yml'}", f"--storage.tsdb.path={root / 'data'}",
           f"--web.listen-address={url.removeprefix('http://')}", "--log.level=warn"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        wait_until_ok(f"{url}/-/ready", 60, alive=lambda: proc.poll() is None)
        # Prometheus applies new targets every 5 s: wait for the first scrape, so the load is seen as it runs.
        _until(lambda: _has_value(url, "max(up)", 1), "prometheus never scraped the server")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def query(prometheus: str, expr: str) -> list[dict[str, Any]]:
    body = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


def _until(check, what: str, timeout_s: float = 30):
    """Poll `check` until it returns a truthy value (rates need two scrapes of a series)."""
    deadline = time.monotonic() + timeout_s
    while (result := check()) is None or not result:
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.5)
    return result


def _has_value(prometheus: str, expr: str, expected: float) -> bool:
    result = query(prometheus, expr)
    return bool(result) and float(result[0]["value"][1]) == expected


def test_every_dashboard_query_returns_data(server, prometheus):
    workload = Workload(num_requests=NUM_REQUESTS, rate=8.0, prompt_len=LengthRange(4, 16),
                        output_len=LengthRange(4, 8), token_ids=LengthRange(5, 250))  # fmt: skip
    report = asyncio.run(run_load(server, workload, timeout_s=60))
    assert (report["completed"], report["failed"]) == (NUM_REQUESTS, 0)
    assert httpx.post(f"{server}/v1/completions", json={"model": "nope", "prompt": "x"}).status_code == 404
    _until(lambda: _has_value(prometheus, "sum(loraplex_requests_total)", NUM_REQUESTS), "requests never scraped")
    _until(lambda: _has_value(prometheus, 'sum(loraplex_request_errors_total{status="404"})', 1), "404 never scraped")
    queries = dashboard_queries()
    assert len(queries) >= 20
    empty: list[str] = []

    def all_have_data() -> bool:
        empty[:] = [expr for expr in queries if not query(prometheus, expr)]
        return not empty

    with contextlib.suppress(TimeoutError):
        _until(all_have_data, "queries without data")
    assert not empty, f"queries without data: {empty}"
    exposed = httpx.get(f"{server}/metrics").text
    for name in {m for expr in queries for m in re.findall(r"loraplex_\w+", expr)}:
        assert f"\n{name}" in exposed, f"the dashboard reads {name}, which the server does not expose"
    ttft = query(prometheus, "sum by (adapter) (loraplex_time_to_first_token_seconds_count)")
    assert {series["metric"]["adapter"] for series in ttft} == {"tiny", "sql"}
