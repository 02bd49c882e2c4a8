"""Tool calls served by structured outputs: `tool_choice` "required" or a named function constrains the reply to
JSON arguments, which come back as `tool_calls` with `finish_reason: "tool_calls"`.

"required" generates a JSON array of `{"name", "arguments"}` objects, each function's arguments under its own
schema; a named function generates its arguments object alone. "none" answers in text (the tools are still passed
to the chat template). "auto" needs a chat template that renders tools and a parser for the model's own call
format, which this server does not have: it is refused with a 400, as vLLM does without a tool-call parser.
"""

from __future__ import annotations

import json
from typing import Any

from server.api.schemas import ChatCompletionRequest, GenerationRequest
from server.api.tool_schemas import FunctionCall, NamedToolChoice, ToolCall
from server.errors import InvalidRequestError


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
    raise InvalidRequestError('tool_choice "auto" (the default with tools) needs a tool-call parser this server does '
                              'not have; send "required", a named function or "none"', param="tool_choice")  # fmt: skip


def forces_tool_call(body: GenerationRequest) -> bool:
    return tool_schema(body) is not None


def tool_calls(body: ChatCompletionRequest, text: str) -> list[ToolCall]:
    """The calls in a complete constrained reply (it parses: the grammar guarantees it)."""
    if isinstance(body.tool_choice, NamedToolChoice):
        return [ToolCall(function=FunctionCall(name=body.tool_choice.function.name, arguments=text))]
    return [ToolCall(function=FunctionCall(name=call["name"], arguments=json.dumps(call["arguments"])))
            for call in json.loads(text)]  # fmt: skip
