"""Property-based fuzzing of the generation and tokenizer routes against the real app and engine on a tiny model.

Bodies come from the app's own /openapi.json schemas and beyond them (fields broken, unknown fields, lone
surrogates, huge numbers, deep nesting, bytes that are not JSON). Every answer is below 500, every refusal has the
OpenAI error shape, and afterwards the server is healthy, a fixed greedy request gives the same text as before, and
no KV block, request or adapter reference is left behind.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.api import create_app
from server.engine.factory import build_engine
from server.settings import Settings
from tests.fuzz.strategies import SchemaStrategies, raw_bodies
from tests.helpers import make_peft_adapter

T = TypeVar("T")
ROUTES = {
    "/v1/completions": "CompletionRequest",
    "/v1/chat/completions": "ChatCompletionRequest",
    "/tokenize": "TokenizeRequest",
    "/detokenize": "DetokenizeRequest",
}
MODELS = ["tiny", "qv"]
GREEDY = {"model": "qv", "prompt": "hello there", "max_tokens": 8, "temperature": 0}
FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


class LiveApp:
    """The app with a real engine, its lifespan and client running on an event loop in a thread of their own.

    Hypothesis drives tests synchronously, so each request is handed to that loop and awaited from here.
    """

    def __init__(self, settings: Settings) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-app", daemon=True)
        self.thread.start()
        self.app = create_app(settings, build_engine)
        self.lifespan = self.app.router.lifespan_context(self.app)
        self.run(self.lifespan.__aenter__())
        transport = httpx.ASGITransport(self.app)
        self.client = self.run(self._client(transport))
        self.run(self._wait_healthy())

    @staticmethod
    async def _client(transport: httpx.ASGITransport) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120)

    async def _wait_healthy(self) -> None:
        for _ in range(600):
            if (await self.client.get("/health")).status_code == 200:
                return
            await asyncio.sleep(0.1)
        raise TimeoutError("the app never became healthy")

    def run(self, work: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(work, self.loop).result(timeout=300)

    def post(self, path: str, content: bytes) -> httpx.Response:
        headers = {"content-type": "application/json"}
        return self.run(self.client.post(path, content=content, headers=headers))

    def engine_state(self) -> dict[str, Any]:
        """What the engine holds: KV blocks in use, requests, work, and adapter references."""
        engine = self.app.state.engine_state.engine

        def inspect(core: Any) -> dict[str, Any]:
            return {
                "used_blocks": core.scheduler.block_manager.num_used_blocks,
                "requests": len(core.requests),
                "has_work": core.has_work,
            }

        state = self.run(engine.call(inspect))
        state["adapters_in_use"] = [
            (v.name, v.running, v.waiting) for v in engine.adapters.views() if v.running or v.waiting
        ]
        return state

    def close(self) -> None:
        self.run(self.client.aclose())
        self.run(self.lifespan.__aexit__(None, None, None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def live(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveApp]:
    store = tmp_path_factory.mktemp("fuzz-store")
    make_peft_adapter(tiny_model_dir, store / "qv", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    settings = Settings(
        model=tiny_model_dir, adapters_store=store, served_model_name="tiny", kv_cache_bytes=2**21, block_size=4,
        max_model_len=64, max_num_seqs=4, max_queue=16, max_n=2, max_prompts=3, max_messages=6, max_text_chars=256,
        max_request_bytes=2**16, max_loras=2, max_cpu_loras=2,
    )  # fmt: skip
    app = LiveApp(settings)
    yield app
    app.close()


@pytest.fixture(scope="module")
def schemas(live: LiveApp) -> SchemaStrategies:
    return SchemaStrategies(live.run(live.client.get("/openapi.json")).json())


@pytest.fixture(scope="module")
def reference_text(live: LiveApp) -> str:
    response = live.post("/v1/completions", json.dumps(GREEDY).encode())
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def assert_sane(response: httpx.Response) -> None:
    """Below 500; a refusal in the OpenAI error shape; a success with its body complete."""
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert isinstance(error["message"], str) and error["message"]
        assert error["param"] is None or isinstance(error["param"], str)
    elif response.headers["content-type"].startswith("text/event-stream"):
        assert response.text.endswith("data: [DONE]\n\n")
        assert '"error"' not in response.text, response.text
    else:
        assert response.json()


def with_model(body: Any, model: str) -> Any:
    return {**body, "model": model} if isinstance(body, dict) and "model" in body else body


@pytest.mark.slow
def test_hostile_bodies_get_4xx_and_leave_the_server_as_it_was(
    live: LiveApp, schemas: SchemaStrategies, reference_text: str
) -> None:
    bodies = st.sampled_from(sorted(ROUTES)).flatmap(
        lambda route: st.tuples(st.just(route), schemas.bodies(ROUTES[route]), st.sampled_from([*MODELS, None]))
    )

    @FUZZ
    @given(bodies)
    def one_request(case: tuple[str, dict[str, Any], str | None]) -> None:
        route, body, model = case
        if model is not None:  # mostly a served model, so that the request gets past the 404
            body = with_model(body, model)
        assert_sane(live.post(route, json.dumps(body).encode()))

    @FUZZ
    @given(st.sampled_from(sorted(ROUTES)), raw_bodies)
    def one_raw_request(route: str, content: bytes) -> None:
        assert_sane(live.post(route, content))

    one_request()
    one_raw_request()
    assert live.run(live.client.get("/health")).status_code == 200
    after = live.post("/v1/completions", json.dumps(GREEDY).encode())
    assert after.status_code == 200 and after.json()["choices"][0]["text"] == reference_text
    assert live.engine_state() == {"used_blocks": 0, "requests": 0, "has_work": False, "adapters_in_use": []}
