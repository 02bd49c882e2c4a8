"""The ingress: the one HTTP entry of the Ray Serve application, forwarding every request to an engine replica.

Generation requests stream back chunk by chunk; for an adapter they go with the adapter as Ray Serve's multiplexed
model id (routed to a replica holding it while its load stays near the others', `server.cluster.routing`);
everything else, base-model requests included, goes to the least loaded replica. A replica that dies before a
response's first body chunk is retried on another (the client saw nothing yet); one that dies later ends an event
stream with an error event. Admin changes run on one replica, which writes the shared store; the others re-read the
adapter before the call returns. A key-file reload runs on every replica. `/metrics` gathers every replica's series.
"""

# No `from __future__ import annotations`: Ray Serve's ingress rebuilds the routes' signatures, and FastAPI must see
# real classes (a string `Request` becomes a required query parameter, answered with 422).
import json
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request, Response
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.responses import StreamingResponse

from server.api.errors import error_body, error_response
from server.api.routes_admin import upload_limit
from server.cluster.messages import REPLICA_HEADER, ProxiedRequest, ResponseHead
from server.cluster.metrics_merge import merge_expositions
from server.errors import LoraplexError, PayloadTooLargeError, ServiceUnavailableError
from server.metrics import CONTENT_TYPE
from server.settings import Settings

log = logging.getLogger(__name__)

ATTEMPTS = 3  # replicas tried for a request that has produced no output yet
GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
ADMIN_PATH = "/admin/adapters"
KEYS_RELOAD_PATH = "/admin/keys/reload"  # every replica re-reads the key file: a revoked key must stop everywhere
ADMIN_CHANGES = ("POST", "PATCH", "DELETE")
BROADCAST_TIMEOUT_S = 60.0
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]


def _log_lost(request: ProxiedRequest, attempt: int, exc: Exception) -> None:
    log.warning("replica lost before answering %s %s (attempt %d): %s", request.method, request.path, attempt, exc)


def _unavailable() -> ServiceUnavailableError:
    return ServiceUnavailableError(f"no engine replica could serve the request in {ATTEMPTS} attempts; retry")


async def _read_body(request: Request, limit: int) -> bytes:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(f"the request body is over {limit} bytes; send a smaller one")
        chunks.append(chunk)
    return b"".join(chunks)


async def _rest(head: ResponseHead, first: bytes, parts: DeploymentResponseGenerator) -> AsyncIterator[bytes]:
    """The body from its first chunk on; a replica lost mid-stream ends an event stream with an error event."""
    finished = False
    try:
        if first:
            yield first
        async for chunk in parts:
            yield chunk
        finished = True
    except RayActorError as exc:
        finished = True
        log.warning("replica lost mid-response: %s", exc)
        if (head.header("content-type") or "").startswith("text/event-stream"):
            error = ServiceUnavailableError("the engine replica serving this request stopped; retry the request")
            yield f"data: {json.dumps(error_body(error))}\n\ndata: [DONE]\n\n".encode()
    finally:
        if not finished:
            parts.cancel()  # the client went away: the replica aborts the request and frees its KV blocks


def _response(head: ResponseHead, body: bytes) -> Response:
    response = Response(body, status_code=head.status)
    response.raw_headers = list(head.headers)
    return response


def _streamed(head: ResponseHead, body: AsyncIterator[bytes]) -> StreamingResponse:
    response = StreamingResponse(body, status_code=head.status)
    response.raw_headers = list(head.headers)
    return response


# The module's helpers come before the deployment: Ray Serve serializes the class when it is decorated.
ingress_app = FastAPI(title="loraplex", docs_url=None, redoc_url=None, openapi_url=None)


@serve.deployment(name="LoraplexIngress", ray_actor_options={"num_cpus": 0})
@serve.ingress(ingress_app)
class Ingress:
    """Forwards the API to the engine replicas; answers /metrics for all of them."""

    def __init__(self, engine: DeploymentHandle, settings: Settings) -> None:
        self.engine = engine
        self.max_body_bytes = max(settings.max_request_bytes, upload_limit(settings))
        self._base_model: str | None = None

    @ingress_app.get("/metrics", include_in_schema=False)
    async def metrics(self) -> Response:
        texts = await self.engine.broadcast("metrics").results_async(timeout_s=10, return_exceptions=True)
        for failure in (text for text in texts if not isinstance(text, bytes)):
            log.warning("a replica gave no metrics: %s", failure)
        return Response(merge_expositions(t for t in texts if isinstance(t, bytes)), media_type=CONTENT_TYPE)

    @ingress_app.api_route("/{path:path}", methods=METHODS, include_in_schema=False)
    async def forward(self, request: Request) -> Response:
        try:
            proxied = ProxiedRequest(
                request.method, request.url.path, request.url.query.encode(), list(request.headers.raw),
                await _read_body(request, self.max_body_bytes),
            )  # fmt: skip
            if proxied.method == "POST" and proxied.path in GENERATION_PATHS:
                head, first, parts = await self._open(proxied, await self._adapter_of(proxied))
                return _streamed(head, _rest(head, first, parts))
            if proxied.method == "POST" and proxied.path == KEYS_RELOAD_PATH:
                head, body = await self._respond_everywhere(proxied)
            else:
                head, body = await self._respond(proxied)
        except LoraplexError as exc:
            return error_response(exc)
        if proxied.method in ADMIN_CHANGES and proxied.path.startswith(ADMIN_PATH) and head.status < 300:
            await self._refresh_replicas(json.loads(body)["name"], head.header(REPLICA_HEADER) or "")
        return _response(head, body)

    async def _adapter_of(self, request: ProxiedRequest) -> str | None:
        """The adapter a generation request names, or None (base model, or a body the replica will reject)."""
        try:
            model = json.loads(request.body).get("model")
        except (ValueError, AttributeError):
            return None
        if not isinstance(model, str) or model == await self._served_model_name():
            return None
        return model

    async def _served_model_name(self) -> str:
        if self._base_model is None:
            self._base_model = await self.engine.served_model_name.remote()
        return self._base_model

    async def _open(
        self, request: ProxiedRequest, adapter: str | None
    ) -> tuple[ResponseHead, bytes, DeploymentResponseGenerator]:
        """Send `request` to a replica and wait for its head and first body chunk, retrying a replica that died."""
        handle = self.engine.options(stream=True, multiplexed_model_id=adapter or "")
        for attempt in range(1, ATTEMPTS + 1):
            parts: DeploymentResponseGenerator = handle.handle.remote(request)
            try:
                head = await parts.__anext__()
                first = await anext(parts, b"")
            except RayActorError as exc:
                _log_lost(request, attempt, exc)
                continue
            return head, first, parts
        raise _unavailable()

    async def _respond(self, request: ProxiedRequest) -> tuple[ResponseHead, bytes]:
        """A whole response from a replica, retrying a replica that died (admin changes are atomic in the store)."""
        for attempt in range(1, ATTEMPTS + 1):
            try:
                return await self.engine.respond.remote(request)
            except RayActorError as exc:
                _log_lost(request, attempt, exc)
        raise _unavailable()

    async def _respond_everywhere(self, request: ProxiedRequest) -> tuple[ResponseHead, bytes]:
        """`request` served by every replica; the answer with the highest status (an error anywhere is the answer).

        A replica that is gone is left out: it restarts from the same file.
        """
        results = await self.engine.broadcast("respond", request).results_async(
            timeout_s=BROADCAST_TIMEOUT_S, return_exceptions=True
        )
        answers = [result for result in results if not isinstance(result, BaseException)]
        for failure in (result for result in results if isinstance(result, BaseException)):
            log.warning("a replica did not answer %s %s: %s", request.method, request.path, failure)
        if not answers:
            raise _unavailable()
        return max(answers, key=lambda answer: answer[0].status)

    async def _refresh_replicas(self, name: str, origin: str) -> None:
        """Make every replica serve `name` as the store now holds it, before the admin call returns."""
        results = await self.engine.broadcast("refresh_adapter", name, origin).results_async(
            timeout_s=BROADCAST_TIMEOUT_S, return_exceptions=True
        )
        for failure in (result for result in results if isinstance(result, BaseException)):
            # A replica that is gone restarts from the store, which already holds the change.
            log.warning("a replica did not refresh adapter %s: %s", name, failure)
