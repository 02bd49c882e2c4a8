"""Pure ASGI middleware that answers 413 for request bodies over the size limit."""

from __future__ import annotations

from collections.abc import Mapping

from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.errors import send_error
from server.errors import PayloadTooLargeError


class BodyLimitMiddleware:
    """Refuse bodies over `max_bytes`: by Content-Length up front, or by counting a chunked body as it arrives.

    The body is read here in full (the routes would read it whole anyway) and replayed to the app, so the app
    never sees a truncated body and the limit needs no cooperation from FastAPI's body parsing. Paths in `streamed`
    (file uploads) have their own limit and pass through unbuffered: their body is counted as the route reads it,
    and reading past the limit raises PayloadTooLargeError in the route.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, streamed: Mapping[str, int] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.streamed = dict(streamed or {})  # path -> its limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.streamed.get(scope["path"], self.max_bytes)
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await send_error(scope, receive, send, _too_large(limit))
            return
        if scope["path"] in self.streamed:
            await self.app(scope, _counted(receive, limit), send)
            return
        try:
            body = await self._read_body(receive)
        except ClientDisconnect:
            return
        if body is None:
            await self._refuse(scope, receive, send)
            return
        await self.app(scope, _replay(body, receive), send)

    async def _read_body(self, receive: Receive) -> bytes | None:
        """The whole body, or None as soon as it exceeds the limit."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnect()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_error(scope, receive, send, _too_large(self.max_bytes))


def _too_large(limit: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(f"request body is over the limit of {limit} bytes")


def _counted(receive: Receive, limit: int) -> Receive:
    """A receive that raises PayloadTooLargeError once the body passes `limit` bytes."""
    size = 0

    async def counted() -> Message:
        nonlocal size
        message = await receive()
        size += len(message.get("body", b""))
        if size > limit:
            raise _too_large(limit)
        return message

    return counted


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that hands out `body` once, then passes through (to report the client's disconnect)."""
    pending = True

    async def replay() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
