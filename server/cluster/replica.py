"""An engine replica: one whole loraplex server (app, engine, adapter registry) as a Ray Serve deployment.

The ingress forwards each HTTP request here with the request's adapter as Ray Serve's multiplexed model id, so Ray
routes an adapter's requests to the replicas that hold it. This replica's multiplexed loader warms the adapter in
its registry; Ray's eviction of it (least recently used, beyond `max_loras` per replica) unloads it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from ray import serve

from server.api import create_app
from server.api.deps import EngineState
from server.api.tenancy import reload_logged
from server.cluster.asgi_bridge import lifespan, run_request
from server.cluster.messages import REPLICA_HEADER, ProxiedRequest, ResponseHead
from server.engine.async_engine import AsyncEngine
from server.engine.factory import build_engine
from server.errors import LoraplexError, NotFoundError
from server.settings import Settings

log = logging.getLogger(__name__)

READY_POLL_S = 0.05
ENGINE_DEPLOYMENT = "LoraplexEngine"


async def _ready_engine(state: EngineState) -> AsyncEngine:
    """Wait for the app's engine to finish building; raise (so Ray retries the replica) if it failed."""
    while state.engine is None:
        if state.failure is not None:
            raise RuntimeError(state.failure)
        await asyncio.sleep(READY_POLL_S)
    return state.engine


class AdapterLease:
    """An adapter this replica holds for Ray Serve's multiplexing; Ray calls `__del__` when it evicts it."""

    def __init__(self, name: str, unload: Callable[[str], None]) -> None:
        self.name = name
        self._unload: Callable[[str], None] | None = unload

    def __del__(self) -> None:
        unload, self._unload = self._unload, None  # Ray calls it on eviction, the garbage collector again later
        if unload is not None:
            unload(self.name)


@serve.deployment(name=ENGINE_DEPLOYMENT, health_check_period_s=2, health_check_timeout_s=30)
class EngineReplica:
    """A loraplex engine and its API, serving the requests the ingress forwards."""

    async def __init__(self, settings: Settings) -> None:
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.app = create_app(settings, build_engine)
        self._lifespan = lifespan(self.app)  # held: collecting it would run its exit, which stops the engine
        await self._lifespan.__aenter__()  # builds the engine; __del__ stops it
        self.engine = await _ready_engine(self.app.state.engine_state)
        self._loop = asyncio.get_running_loop()

        async def load_adapter(name: str) -> AdapterLease:
            return await self._lease(name)

        # Wired here, not on the class, because the cap is a setting: one multiplexed adapter per device slot.
        self.load_adapter = serve.multiplexed(max_num_models_per_replica=settings.max_loras)(load_adapter)
        log.info("replica %s serving %s", self.replica_id, self.engine.served_model_name)

    async def handle(self, request: ProxiedRequest) -> AsyncIterator[ResponseHead | bytes]:
        """Serve one forwarded request: the response head (naming this replica), then its body chunks."""
        adapter = serve.get_multiplexed_model_id()
        if adapter and self._serves(adapter):  # for an unknown one the app answers 404
            with contextlib.suppress(NotFoundError):  # deleted meanwhile: the app answers 404 too
                await self.load_adapter(adapter)
        async for part in run_request(self.app, request):
            if isinstance(part, ResponseHead):
                part = ResponseHead(part.status, [*part.headers, (REPLICA_HEADER.encode(), self.replica_id.encode())])
            yield part

    async def respond(self, request: ProxiedRequest) -> tuple[ResponseHead, bytes]:
        """Serve one forwarded request whole: for answers that do not stream, and for calls to every replica."""
        head, chunks = None, []
        async for part in self.handle(request):
            if isinstance(part, ResponseHead):
                head = part
            else:
                chunks.append(part)
        if head is None:
            raise RuntimeError(f"the app sent no response to {request.method} {request.path}")
        return head, b"".join(chunks)

    def served_model_name(self) -> str:
        return self.engine.served_model_name

    def name(self) -> str:
        return self.replica_id

    async def refresh_adapter(self, name: str, origin: str) -> None:
        """Serve `name` as the shared store now holds it; the replica `origin` made the change and has it already.

        A pinned adapter is loaded at once, as the replica that pinned it did.
        """
        if origin == self.replica_id:
            return
        self.engine.refresh_adapter(name)
        with contextlib.suppress(NotFoundError):  # removed
            if self.engine.adapter_view(name).meta.pinned:
                await self.engine.prefetch_adapter(name)

    def reload_keys(self) -> None:
        """Re-read the key file as a SIGHUP does to one server: `serve-ray` forwards its SIGHUP to every replica."""
        tenants = self.app.state.tenants
        if tenants is not None:
            reload_logged(tenants)

    def metrics(self) -> bytes:
        """This replica's metrics, every sample labelled with the replica."""
        return self.app.state.metrics.render({"replica": self.replica_id})

    def check_health(self) -> None:
        """Ray restarts a replica whose engine stopped."""
        self.app.state.engine_state.require()

    def __del__(self) -> None:
        """Ray calls this when it stops the replica (and the garbage collector may again): stop the engine once."""
        engine = self.__dict__.pop("engine", None)
        if engine is not None:
            engine.shutdown()

    async def _lease(self, name: str) -> AdapterLease:
        """Load `name` into host memory here (a cold load runs off the engine thread); NotFoundError if unknown."""
        await self.engine.prefetch_adapter(name)
        return AdapterLease(name, self._unload_soon)

    def _serves(self, name: str) -> bool:
        try:
            return self.engine.resolve_adapter(name) is not None
        except LoraplexError:
            return False

    def _unload_soon(self, name: str) -> None:
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._unload, name)

    def _unload(self, name: str) -> None:
        try:
            if not self.engine.adapter_view(name).meta.pinned:  # pinned adapters stay resident by contract
                self.engine.refresh_adapter(name)
        except LoraplexError:
            return  # removed meanwhile: nothing left to unload
