"""The Ray layer's pieces that need no cluster: merged metrics, the in-process ASGI bridge, the optional import."""

from __future__ import annotations

import asyncio
import subprocess
import sys

from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from prometheus_client.parser import text_string_to_metric_families

from server.cluster.asgi_bridge import run_request
from server.cluster.messages import ProxiedRequest, ResponseHead
from server.cluster.metrics_merge import merge_expositions
from server.metrics import Metrics, RequestTrace


def test_merged_metrics_keep_every_replicas_series_under_one_family():
    first, second = Metrics(4, 2), Metrics(4, 2)
    for metrics, requests in ((first, 2), (second, 3)):
        metrics.set_base_model("tiny")
        for _ in range(requests):
            metrics.record_request("tiny", RequestTrace(4))
    text = merge_expositions([first.render({"replica": "a"}), second.render({"replica": "b"})]).decode()
    families = {family.name: family for family in text_string_to_metric_families(text)}
    served = {s.labels["replica"]: s.value for s in families["loraplex_requests"].samples}
    assert served == {"a": 2, "b": 3}
    assert text.count("# TYPE loraplex_requests_total counter") == 1


def test_render_without_labels_is_unchanged():
    metrics = Metrics(4, 2)
    assert b'replica="' not in metrics.render()


async def test_the_bridge_streams_an_apps_response_and_cancels_it_when_left():
    app = FastAPI()
    closed = []

    async def chunks():
        try:
            for i in range(1000):
                yield f"{i}\n"
        finally:
            closed.append(True)

    @app.post("/echo")
    async def echo(body: dict) -> StreamingResponse:
        return StreamingResponse(chunks(), headers={"x-echo": body["say"]})

    request = ProxiedRequest("POST", "/echo", headers=[(b"content-type", b"application/json")], body=b'{"say":"hi"}')
    parts = run_request(app, request)
    head = await anext(parts)
    assert isinstance(head, ResponseHead) and head.status == 200 and head.header("X-Echo") == "hi"
    assert await anext(parts) == b"0\n"
    await parts.aclose()
    for _ in range(100):
        if closed:
            break
        await asyncio.sleep(0.01)
    assert closed


def test_importing_the_server_and_its_cli_does_not_import_ray():
    code = "import sys, server, server.cli; server.cli.build_parser(); sys.exit('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
