"""The official `openai` client against a real server (tiny model, one adapter): logprobs, scoring, sampling
controls, structured outputs and the tokenizer routes, with the real tokenizer on the way."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest
import torch

from tests.helpers import make_peft_adapter, make_tiny_checkpoint, peft_logits
from tests.test_server_e2e import start_server

PROMPT = "The cat sat on the mat"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def store(model_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("store")
    make_peft_adapter(model_dir, root / "dora", r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj"])
    return root


@pytest.fixture(scope="module")
def server(model_dir, store) -> Iterator[str]:
    proc, url = start_server(model_dir, "--adapters-store", str(store), "--served-model-name", "tiny",
                             "--kv-cache-bytes", str(2**22), "--dtype", "float32")  # fmt: skip
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def test_echo_scores_a_prompt_exactly(server, client, model_dir, store) -> None:
    tokens = httpx.post(f"{server}/tokenize", json={"model": "dora", "prompt": PROMPT}).json()["tokens"]
    completion = client.completions.create(model="dora", prompt=PROMPT, max_tokens=0, echo=True, logprobs=2)
    (choice,) = completion.choices
    assert choice.text == PROMPT and choice.finish_reason == "length"
    assert (
        "".join(choice.logprobs.tokens) == httpx.post(f"{server}/detokenize", json={"tokens": tokens}).json()["prompt"]
    )
    want = torch.log_softmax(peft_logits(model_dir, store / "dora", tokens), -1)[:-1]
    want = want.gather(-1, torch.tensor(tokens[1:])[:, None]).squeeze(-1)
    assert choice.logprobs.token_logprobs[0] is None
    torch.testing.assert_close(torch.tensor(choice.logprobs.token_logprobs[1:]), want, atol=1e-4, rtol=0)
    assert all(len(top) in (2, 3) for top in choice.logprobs.top_logprobs[1:])


def test_streamed_chat_logprobs(client) -> None:
    stream = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5, logprobs=True, top_logprobs=3,
        stream=True, temperature=0, extra_body={"min_tokens": 5},
    )  # fmt: skip
    entries = [e for chunk in stream for c in chunk.choices if c.logprobs for e in c.logprobs.content]
    assert len(entries) == 5
    assert all(e.top_logprobs[0].logprob == pytest.approx(e.logprob) for e in entries)  # greedy picks the best


def test_logit_bias_bans_the_greedy_token(server, client) -> None:
    def first_token(**extra) -> int:
        completion = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=1, temperature=0, logprobs=0,
                                               extra_body={"min_tokens": 1}, **extra)  # fmt: skip
        return completion.choices[0].logprobs.tokens[0]

    greedy = first_token()
    # The tiny tokenizer is byte-level: a token's text tokenizes back to that one token.
    tokens = httpx.post(f"{server}/tokenize", json={"prompt": greedy, "add_special_tokens": False}).json()["tokens"]
    assert first_token(logit_bias={str(tokens[0]): -100}) != greedy


def test_tokenize_chat_matches_what_chat_completions_count(server, client) -> None:
    messages = [{"role": "user", "content": "hello there"}]
    body = httpx.post(f"{server}/tokenize", json={"model": "dora", "messages": messages, "return_token_strs": True})
    reply = client.chat.completions.create(model="dora", messages=messages, max_tokens=1)
    assert body.json()["count"] == reply.usage.prompt_tokens == len(body.json()["token_strs"])


SCHEMA = {
    "type": "object",
    "properties": {"mood": {"enum": ["happy", "sad"]}, "level": {"type": "integer", "minimum": 0, "maximum": 9},
                   "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
    "required": ["mood", "level", "tags"],
    "additionalProperties": False,
}  # fmt: skip
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "mood", "schema": SCHEMA, "strict": True}}


@pytest.mark.parametrize("model", ["tiny", "dora"])
def test_chat_json_schema_validates_whole_and_streamed(client, model) -> None:
    messages = [{"role": "user", "content": "How are you?"}]
    reply = client.chat.completions.create(model=model, messages=messages, response_format=RESPONSE_FORMAT, n=3,
                                           seed=1, max_tokens=64)  # fmt: skip
    texts = [choice.message.content for choice in reply.choices]
    stream = client.chat.completions.create(model=model, messages=messages, response_format=RESPONSE_FORMAT,
                                            seed=2, max_tokens=64, stream=True)  # fmt: skip
    texts.append("".join(c.choices[0].delta.content or "" for c in stream if c.choices))
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMA)


def test_completion_choice_and_regex(client) -> None:
    choice = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, seed=3,
                                       extra_body={"structured_outputs": {"choice": ["left", "right"]}})  # fmt: skip
    assert choice.choices[0].text in ("left", "right") and choice.choices[0].finish_reason == "stop"
    regex = client.completions.create(model="dora", prompt=PROMPT, max_tokens=12, seed=3,
                                      extra_body={"structured_outputs": {"regex": r"[0-9]{3}-[a-z]{2}"}})  # fmt: skip
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", regex.choices[0].text)


def test_uncompilable_schema_is_a_400(client) -> None:
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "minProperties": "two"}}}
    with pytest.raises(openai.BadRequestError, match=r"response_format\.json_schema\.schema"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a"}], response_format=bad)


WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}, "days": {"type": "integer",
           "minimum": 1, "maximum": 7}}, "required": ["city", "days"], "additionalProperties": False}  # fmt: skip
TIME = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
        "additionalProperties": False}  # fmt: skip
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "now", "parameters": TIME}}]  # fmt: skip
ASK = [{"role": "user", "content": "Weather in Paris for 3 days?"}]


@pytest.mark.parametrize("stream", [False, True])
def test_named_and_required_tool_calls(client, stream) -> None:
    named = {"type": "function", "function": {"name": "get_time"}}
    for choice, seed in ((named, 1), ("required", 2), ("required", 3)):
        # A random model would keep adding calls: one call at most here.
        reply = client.chat.completions.create(model="dora", messages=ASK, tools=TOOLS, tool_choice=choice, seed=seed,
                                               max_tokens=80, stream=stream, parallel_tool_calls=False)  # fmt: skip
        if stream:
            chunks = [c for c in reply if c.choices]
            finish = chunks[-1].choices[0].finish_reason
            calls = [call for c in chunks for call in c.choices[0].delta.tool_calls or []]
        else:
            finish, calls = reply.choices[0].finish_reason, reply.choices[0].message.tool_calls or []
            assert reply.choices[0].message.content is None
        assert finish == "tool_calls" and calls
        for call in calls:
            assert call.id.startswith("call_") and call.type == "function"
            jsonschema.validate(json.loads(call.function.arguments), {"get_weather": WEATHER, "get_time": TIME}[
                call.function.name])  # fmt: skip
        if choice is named:
            assert [call.function.name for call in calls] == ["get_time"]


def test_tool_results_flow_back_through_the_template(client) -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]  # fmt: skip
    reply = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, tool_choice="none",
                                           max_tokens=4, temperature=0)  # fmt: skip
    assert reply.choices[0].message.content is not None and reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > len("sunny, 21 C")


def test_tool_choice_auto_is_refused(client) -> None:
    with pytest.raises(openai.BadRequestError, match="auto"):
        client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS)
