"""The OpenAI Agents SDK runs an agent with a function tool against /v1/responses, over real HTTP, end to end."""

from __future__ import annotations

from collections.abc import Iterator

import agents
import openai
import pytest
from api_helpers import served_over_http
from tool_script_engine import ToolScriptEngine

from server.api import create_app
from server.settings import Settings


@pytest.fixture
def served(settings: Settings) -> Iterator[tuple[str, ToolScriptEngine]]:
    """The app on a real port (uvicorn in a thread of its own), over an engine scripted to call a tool."""
    engine = ToolScriptEngine()
    with served_over_http(create_app(settings, lambda *_: engine)) as url:
        yield url, engine


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
