"""Drive an ASGI app in-process: its lifespan, and one request whose response comes back as a stream of parts.

A replica serves requests the ingress forwards by calling the loraplex app directly, with no socket in between.
Leaving the stream early (the client went away, or Ray cancelled the call) cancels the app's task, which closes its
streaming response and so aborts the request inside the engine.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Any

from starlette.types import ASGIApp, Message

from server.cluster.messages import ProxiedRequest, ResponseHead


def lifespan(app: Any) -> AbstractAsyncContextManager[None]:
    """The app's startup and shutdown as one context manager (FastAPI runs its lifespan through its router)."""
    return app.router.lifespan_context(app)


def http_scope(request: ProxiedRequest, client: tuple[str, int] = ("127.0.0.1", 0)) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": request.method,
        "scheme": "http",
        "path": request.path,
        "raw_path": request.path.encode(),
        "query_string": request.query_string,
        "root_path": "",
        "headers": request.headers,
        "client": client,
        "server": ("127.0.0.1", 0),
        "state": {},
    }


async def run_request(app: ASGIApp, request: ProxiedRequest) -> AsyncIterator[ResponseHead | bytes]:
    """Call `app` with `request`: yields the response head, then each non-empty body chunk."""
    messages: asyncio.Queue[Message | None] = asyncio.Queue()
    disconnected = asyncio.Event()
    body_pending = True

    async def receive() -> Message:
        nonlocal body_pending
        if body_pending:
            body_pending = False
            return {"type": "http.request", "body": request.body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        await messages.put(message)

    task = asyncio.create_task(app(http_scope(request), receive, send))
    task.add_done_callback(lambda _: messages.put_nowait(None))
    try:
        while (message := await messages.get()) is not None:
            if message["type"] == "http.response.start":
                yield ResponseHead(message["status"], list(message.get("headers", [])))
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield bytes(message["body"])
                if not message.get("more_body", False):
                    break
        await task  # the app's own error, if it failed before answering
    finally:
        disconnected.set()
        if not task.done():
            task.cancel()
