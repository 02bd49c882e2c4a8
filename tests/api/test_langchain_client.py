"""LangChain's `ChatOpenAI` against the server over real HTTP, unchanged but for `base_url`: invoke, stream and
logprobs on the tiny random model (plumbing: what LangChain reports must be what the server generated); structured
output and a named tool call on the real default model, where a one-property schema once rambled past its property."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from admin_helpers import admin_settings
from api_helpers import served_over_http
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel

from server.api import create_app
from server.engine.factory import build_engine
from server.settings import Settings

HELLO = "Hello, who are you?"
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def tiny_url(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    settings = admin_settings(tiny_model_dir, tmp_path_factory.mktemp("store"))
    with served_over_http(create_app(settings, build_engine), timeout_s=60) as url:
        yield url


def tiny_chat(url: str, **options: object) -> ChatOpenAI:
    return ChatOpenAI(
        base_url=f"{url}/v1", api_key="x", model="tiny", temperature=0, max_tokens=MAX_TOKENS, max_retries=0, **options
    )


def sdk_reply(url: str) -> str:
    """The same greedy chat through the official `openai` SDK: what LangChain must hand back."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    messages = [{"role": "user", "content": HELLO}]
    reply = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=MAX_TOKENS)
    return reply.choices[0].message.content or ""


def test_invoke_returns_the_generated_text_and_its_usage(tiny_url: str) -> None:
    message = tiny_chat(tiny_url).invoke(HELLO)
    assert message.content == sdk_reply(tiny_url) != ""
    assert message.response_metadata["finish_reason"] == "length"
    assert message.usage_metadata is not None and message.usage_metadata["output_tokens"] == MAX_TOKENS


def test_stream_delivers_the_same_text_in_chunks(tiny_url: str) -> None:
    chunks = list(tiny_chat(tiny_url, stream_usage=True).stream(HELLO))
    assert len([chunk for chunk in chunks if chunk.content]) > 1
    whole = chunks[0]
    for chunk in chunks[1:]:
        whole += chunk
    assert whole.content == sdk_reply(tiny_url)
    assert whole.usage_metadata is not None and whole.usage_metadata["output_tokens"] == MAX_TOKENS


def test_logprobs_land_in_the_response_metadata(tiny_url: str) -> None:
    message = tiny_chat(tiny_url, logprobs=True, top_logprobs=2).invoke(HELLO)
    scored = message.response_metadata["logprobs"]["content"]
    assert len(scored) == MAX_TOKENS
    assert "".join(entry["token"] for entry in scored) == message.content
    for entry in scored:  # greedy: every token is its step's most likely one
        assert len(entry["top_logprobs"]) == 2
        assert entry["logprob"] == entry["top_logprobs"][0]["logprob"] >= entry["top_logprobs"][1]["logprob"]


class Capital(BaseModel):
    city: str
    country: str


@tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    return "sunny"


@pytest.fixture(scope="module")
def default_chat(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChatOpenAI]:
    settings = Settings(
        adapters_store=tmp_path_factory.mktemp("store"), served_model_name="smol", kv_cache_bytes=64 * 2**20
    )
    with served_over_http(create_app(settings, build_engine), timeout_s=120) as url:
        yield ChatOpenAI(base_url=f"{url}/v1", api_key="x", model="smol", temperature=0, max_tokens=48, max_retries=0)


@pytest.mark.slow
def test_structured_output_is_an_object_of_the_declared_fields(default_chat: ChatOpenAI) -> None:
    structured = default_chat.with_structured_output(Capital, method="json_schema", include_raw=True)
    result = structured.invoke("What is the capital of France? Give the city and its country.")
    assert result["parsing_error"] is None
    assert result["parsed"] == Capital(city="Paris", country="France")  # greedy, which knows this one
    assert set(json.loads(result["raw"].content)) == {"city", "country"}
    assert result["raw"].response_metadata["finish_reason"] == "stop"


@pytest.mark.slow
def test_a_named_tool_call_comes_back_with_the_declared_argument(default_chat: ChatOpenAI) -> None:
    message = default_chat.bind_tools([get_weather], tool_choice="get_weather").invoke("What is the weather in Paris?")
    assert not message.invalid_tool_calls
    (call,) = message.tool_calls
    assert call["name"] == "get_weather"
    assert call["args"] == {"city": "Paris"}
    assert get_weather.invoke(call).content == "sunny"
