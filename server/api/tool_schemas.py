"""Tool definitions and tool calls of chat completions, in OpenAI's shapes."""

from __future__ import annotations

import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

MAX_TOOLS = 128
_NAME = r"^[A-Za-z0-9_-]{1,64}$"


class FunctionDefinition(BaseModel):
    """A function the model may call: its name and the JSON schema of its arguments."""

    model_config = ConfigDict(extra="ignore")

    name: str = Field(pattern=_NAME)
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None


class ChatTool(BaseModel):
    """An entry of `tools`."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    """The function a named `tool_choice` forces."""

    name: str


class NamedToolChoice(BaseModel):
    """`tool_choice: {"type": "function", "function": {"name": ...}}`."""

    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCall(BaseModel):
    """The function a tool call names and its arguments as a JSON string."""

    name: str
    arguments: str


class ToolCall(BaseModel):
    """One call in an assistant message's `tool_calls`."""

    id: str = Field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")
    type: Literal["function"] = "function"
    function: FunctionCall


class ToolCallDelta(ToolCall):
    """A tool call in a stream chunk; here each call is sent whole, in one delta."""

    index: int

    @model_serializer(mode="wrap")
    def _ordered(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {"index": self.index, **{k: v for k, v in handler(self).items() if k != "index"}}
