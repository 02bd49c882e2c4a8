"""`GET /metrics` on the app: the exposition format, served while the engine loads, and errors counted by status."""

from __future__ import annotations

import threading

import httpx
from api_helpers import wait_until_healthy
from fake_engine import FakeEngine
from prometheus_client.parser import text_string_to_metric_families

from server.api import create_app
from server.metrics import CONTENT_TYPE, Metrics
from server.settings import Settings


def error_counts(text: str) -> dict[str, float]:
    return {
        sample.labels["status"]: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "loraplex_request_errors"
        for sample in family.samples
        if sample.name.endswith("_total")
    }


async def test_metrics_route_serves_the_prometheus_text_format(client: httpx.AsyncClient) -> None:
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"] == CONTENT_TYPE
    names = {family.name for family in text_string_to_metric_families(response.text)}
    assert {"loraplex_num_requests_running", "loraplex_adapter_cache_events"} <= names


async def test_error_responses_are_counted_by_status(client: httpx.AsyncClient) -> None:
    before = error_counts((await client.get("/metrics")).text)  # 503s while the app came up
    await client.post("/v1/completions", json={"model": "nope", "prompt": "hi"})
    await client.post("/v1/completions", json={"model": "nope", "prompt": "hi"})
    await client.post("/v1/completions", content=b"{", headers={"content-type": "application/json"})
    await client.post("/v1/completions", json={"model": "base-model", "prompt": "x" * 70 * 1024})
    await client.get("/no/such/route")
    counts = error_counts((await client.get("/metrics")).text)
    assert counts == {**before, "404": 3.0, "400": 1.0, "413": 1.0}
    assert (await client.post("/v1/completions", json={"model": "base-model", "prompt": "ok"})).status_code == 200
    assert error_counts((await client.get("/metrics")).text) == counts


async def test_metrics_answer_while_the_engine_loads() -> None:
    release = threading.Event()

    def slow_factory(settings: Settings, metrics: Metrics) -> FakeEngine:
        release.wait(timeout=10)
        return FakeEngine()

    app = create_app(Settings(), slow_factory)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as client,
    ):
        assert (await client.get("/health")).status_code == 503
        assert error_counts((await client.get("/metrics")).text) == {"503": 1.0}
        release.set()
        await wait_until_healthy(client)


async def test_each_app_has_its_own_metrics(engine: FakeEngine) -> None:
    apps = [create_app(Settings(), lambda *_: engine) for _ in range(2)]
    assert apps[0].state.metrics is not apps[1].state.metrics
    assert apps[0].state.metrics.registry is not apps[1].state.metrics.registry
