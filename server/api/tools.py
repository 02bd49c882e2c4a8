"""Tool calls served by structured outputs: `tool_choice` "required" or a named function constrains the reply to
JSON arguments, which come back as `tool_calls` with `finish_reason: "tool_calls"`.

"required" generates a JSON array of `{"name", "arguments"}` objects, each function's arguments under its own
schema; a named function generates its arguments object alone. A reply cut by max_tokens still comes back as the
calls it began, with `finish_reason: "length"`. "none" answers in text. "auto" (the default with tools) lets the
model answer freely and reads its calls out of its answer in its family's format (`server.api.tool_parsers`); it
needs a chat template that renders the tools. In every mode the tools go to the chat template.
"""

from __future__ import annotations

import json
import re
from typing import Any

from server.api.schemas import ChatCompletionRequest, GenerationRequest
from server.api.tool_schemas import FunctionCall, NamedToolChoice, ToolCall
from server.errors import InvalidRequestError

# The opening of one call in a "required" array, up to its arguments; tool names are plain (`tool_schemas._NAME`).
_CALL_OPENING = re.compile(r'\{"name": "(?P<name>[A-Za-z0-9_-]{1,64})", "arguments": ')


def tool_schema(body: GenerationRequest) -> dict[str, Any] | None:
    """The JSON schema a forced tool call must match, or None when the reply is free text."""
    if not isinstance(body, ChatCompletionRequest) or body.tool_choice == "none":
        return None
    if not body.tools:
        if body.tool_choice is not None:
            raise InvalidRequestError("tool_choice needs tools to choose from", param="tool_choice")
        return None
    functions = {tool.function.name: tool.function for tool in body.tools}
    if isinstance(body.tool_choice, NamedToolChoice):
        name = body.tool_choice.function.name
        if name not in functions:
            raise InvalidRequestError(f"tool_choice names {name!r}, which is not among the tools", param="tool_choice")
        return functions[name].parameters
    if body.tool_choice == "required":
        calls = [{"type": "object", "properties": {"name": {"const": name}, "arguments": function.parameters},
                  "required": ["name", "arguments"], "additionalProperties": False}
                 for name, function in functions.items()]  # fmt: skip
        most = {"maxItems": 1} if body.parallel_tool_calls is False else {}
        return {"type": "array", "minItems": 1, **most, "items": {"anyOf": calls}}
    return None


def parses_tool_calls(body: GenerationRequest) -> bool:
    """Whether the answer is free and its calls are parsed out of it: tool_choice "auto", the default with tools."""
    return isinstance(body, ChatCompletionRequest) and bool(body.tools) and body.tool_choice in (None, "auto")


def template_tools(body: ChatCompletionRequest) -> list[dict[str, Any]] | None:
    """The tools in OpenAI's shape, as chat templates take them; None without tools."""
    return [tool.model_dump(exclude_none=True) for tool in body.tools] if body.tools else None


def refuse_auto_without_template() -> InvalidRequestError:
    return InvalidRequestError('tool_choice "auto" (the default with tools) needs a chat template that renders the '
                               "tools, and this model's template ignores them; send tool_choice \"required\", a "
                               'named function or "none"', param="tool_choice")  # fmt: skip


def forces_tool_call(body: GenerationRequest) -> bool:
    return tool_schema(body) is not None


def tool_calls(body: ChatCompletionRequest, text: str) -> list[ToolCall]:
    """The calls in a complete constrained reply (it parses: the grammar guarantees it)."""
    if isinstance(body.tool_choice, NamedToolChoice):
        return [ToolCall(function=FunctionCall(name=body.tool_choice.function.name, arguments=text))]
    return [ToolCall(function=FunctionCall(name=call["name"], arguments=json.dumps(call["arguments"])))
            for call in json.loads(text)]  # fmt: skip


def forced_tool_calls(body: ChatCompletionRequest, text: str, finish_reason: str | None) -> list[ToolCall]:
    """The calls of a forced reply: every call once it is complete ("stop"); cut by max_tokens ("length"), each call
    begun, its arguments as generated (the last one possibly incomplete JSON), as OpenAI and vLLM return them.

    Empty when there is no call to return (a reply cut before the first call's name): the reply is then text.
    """
    if finish_reason == "stop":
        return tool_calls(body, text)
    if finish_reason != "length":
        return []
    if isinstance(body.tool_choice, NamedToolChoice):
        return [ToolCall(function=FunctionCall(name=body.tool_choice.function.name, arguments=text))]
    return _begun_calls(text)


def _begun_calls(text: str) -> list[ToolCall]:
    """The calls of a "required" array cut short, read in the layout its grammar generates (`json.dumps`'s, keys in
    the schema's order): `[{"name": "f", "arguments": {...}}, {"name": "g", "arguments": {...`."""
    calls: list[ToolCall] = []
    position = 1  # after "["
    decoder = json.JSONDecoder()
    while opening := _CALL_OPENING.match(text, position):
        try:
            _, end = decoder.raw_decode(text, opening.end())
        except ValueError:  # the call max_tokens cut: its arguments so far
            calls.append(ToolCall(function=FunctionCall(name=opening["name"], arguments=text[opening.end() :])))
            break
        calls.append(ToolCall(function=FunctionCall(name=opening["name"], arguments=text[opening.end() : end])))
        position = end + len("}, ")
    return calls
