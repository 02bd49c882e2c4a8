"""Helpers for the API tests: waiting for the app, serving it on a real port, reading SSE, driving ASGI by hand."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import uvicorn


async def wait_until_healthy(client: httpx.AsyncClient, timeout_s: float = 5.0) -> None:
    """Poll /health until the background engine build is done."""
    for _ in range(int(timeout_s / 0.01)):
        if (await client.get("/health")).status_code == 200:
            return
        await asyncio.sleep(0.01)
    raise TimeoutError("the app never became healthy")


@contextmanager
def served_over_http(app: Any, timeout_s: float = 10.0) -> Iterator[str]:
    """The app on a real port (uvicorn in a thread of its own, lifespan included), yielding its base URL once healthy:
    for clients that open their own HTTP connections (the Agents SDK, LangChain) rather than take an ASGI transport."""
    server = uvicorn.Server(uvicorn.Config(app, port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout_s
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise TimeoutError("uvicorn never started")
            time.sleep(0.01)
        url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
        while httpx.get(f"{url}/health").status_code != 200:
            if time.monotonic() > deadline:
                raise TimeoutError("the app never became healthy")
            time.sleep(0.05)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def sse_payloads(response: httpx.Response) -> list[dict[str, Any]]:
    """The JSON events of an SSE body, checking the framing and the final [DONE] on the way."""
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    body = response.text
    assert body.endswith("data: [DONE]\n\n")
    events = body.split("\n\n")[:-2]
    assert all(event.startswith("data: ") and "\n" not in event for event in events)
    return [json.loads(event.removeprefix("data: ")) for event in events]


class HangUpCall:
    """One HTTP request driven through an ASGI app by hand, so that the client can hang up half-way."""

    def __init__(self, app: Any, path: str, body: dict[str, Any]) -> None:
        self.app = app
        self.body = json.dumps(body).encode()
        self.path = path
        self.hang_up = asyncio.Event()
        self.got_body = asyncio.Event()
        self.sent: list[dict[str, Any]] = []
        self._body_delivered = False

    async def run(self) -> None:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": self.path,
            "raw_path": self.path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(self.body)).encode())],
            "client": ("127.0.0.1", 50000),
            "server": ("test", 80),
        }
        await self.app(scope, self._receive, self._send)

    async def _receive(self) -> dict[str, Any]:
        if not self._body_delivered:
            self._body_delivered = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        await self.hang_up.wait()
        return {"type": "http.disconnect"}

    async def _send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)
        if message["type"] == "http.response.body" and message.get("body"):
            self.got_body.set()
