"""The OpenAI Agents SDK runs an agent with a function tool against /v1/responses, over real HTTP, end to end."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import agents
import httpx
import openai
import pytest
import uvicorn
from tool_script_engine import ToolScriptEngine

from server.api import create_app
from server.settings import Settings


@pytest.fixture
def served(settings: Settings) -> Iterator[tuple[str, ToolScriptEngine]]:
    """The app on a real port (uvicorn in a thread of its own), over an engine scripted to call a tool."""
    engine = ToolScriptEngine()
    server = uvicorn.Server(uvicorn.Config(create_app(settings, lambda *_: engine), port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    while httpx.get(f"{url}/health").status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.01)
    yield url, engine
    server.should_exit = True
    thread.join(timeout=10)


@pytest.mark.parametrize("streamed", [False, True])
async def test_an_agent_calls_its_tool_and_answers_with_it(
    served: tuple[str, ToolScriptEngine], streamed: bool
) -> None:
    url, engine = served
    agents.set_tracing_disabled(True)  # the SDK would send its traces to OpenAI
    cities: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        cities.append(city)
        return "sunny"

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    model = agents.OpenAIResponsesModel(model="poet", openai_client=client)
    agent = agents.Agent(name="forecaster", instructions="Say the weather.", tools=[get_weather], model=model)
    if streamed:
        result = agents.Runner.run_streamed(agent, "Paris")
        kinds = {event.type async for event in result.stream_events()}
        assert "raw_response_event" in kinds
    else:
        result = await agents.Runner.run(agent, "Paris")
    assert cities == ["Paris"]
    assert result.final_output == "It is sunny there."
    first, second = engine.conversations
    assert first == [{"role": "system", "content": "Say the weather."}, {"role": "user", "content": "Paris"}]
    assert [message["role"] for message in second] == ["system", "user", "assistant", "tool"]
    assert second[-1]["content"] == "sunny" and second[-1]["tool_call_id"] == second[-2]["tool_calls"][0]["id"]
    assert {submitted.adapter for submitted in engine.submitted} == {"poet"}
