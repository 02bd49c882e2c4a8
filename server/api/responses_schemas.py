"""Request body of `POST /v1/responses` (OpenAI's Responses API), as far as a server that stores nothing can serve it.

Items and content parts are flat models rather than unions, so that a refusal names the field at fault
(`input[2].call_id`) instead of a union branch. A string where OpenAI takes one (`input`, a message's `content`, a
call's `output`) is turned into the list it stands for before validation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import PydanticCustomError, core_schema

from server.api.fields import Metadata, MinTokens, Seed, ServiceTier, TokenCount, TopK, tolerated
from server.api.limits import LIMIT_KEY, Bounded
from server.api.schemas import EMPTY_LIST_OR_NULL, NOT_SUPPORTED, REQUEST_CONFIG
from server.api.tool_schemas import MAX_TOOLS

NOT_STORED = "this server does not store responses; send the whole conversation in `input`"
ItemStatus = Literal["in_progress", "completed", "incomplete"]


@dataclass(frozen=True)
class OrString:
    """JSON-schema marker: the field also takes a string, which its validator turns into the list it stands for."""

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {"anyOf": [{"type": "string", LIMIT_KEY: "max_text_chars"}, handler(schema)]}


def _text_parts(value: object) -> object:
    if isinstance(value, str):
        return [{"type": "input_text", "text": value}]
    if not isinstance(value, list):
        raise PydanticCustomError("content_type", "must be a string or a list of input_text/output_text parts")
    return value


def _user_message(value: object) -> object:
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    if not isinstance(value, list):
        raise PydanticCustomError("input_type", "must be a string or a list of input items")
    return value


class ContentPart(BaseModel):
    """Text in a message: `input_text`, or `output_text` as a client sends an earlier answer back."""

    model_config = REQUEST_CONFIG

    type: Literal["input_text", "output_text"]
    text: str
    annotations: list[Any] | None = Field(None, description="accepted and ignored")
    logprobs: list[Any] | None = Field(None, description="accepted and ignored")


Content = Annotated[list[ContentPart], BeforeValidator(_text_parts), OrString()]

# The fields each item type needs; `id` and `status` (output items sent back as they came) are accepted on all.
ITEM_FIELDS: dict[str, tuple[str, ...]] = {
    "message": ("role", "content"),
    "function_call": ("call_id", "name", "arguments"),
    "function_call_output": ("call_id", "output"),
}


class InputItem(BaseModel):
    """An entry of `input`: a message, a function call the model made, or the output of such a call."""

    model_config = REQUEST_CONFIG

    type: Literal["message", "function_call", "function_call_output"] = "message"
    role: Literal["user", "assistant", "system", "developer"] | None = None
    content: Content | None = None
    call_id: str | None = Field(None, min_length=1)
    name: str | None = None
    arguments: str | None = None
    output: Content | None = None
    id: str | None = Field(None, description="accepted and ignored")
    status: ItemStatus | None = Field(None, description="accepted and ignored")

    @model_validator(mode="after")
    def _fields_of_its_type(self) -> InputItem:
        needed = ITEM_FIELDS[self.type]
        missing = [name for name in needed if getattr(self, name) is None]
        if missing:
            raise ValueError(f"a {self.type} item needs {' and '.join(missing)}")
        foreign = [name for names in ITEM_FIELDS.values() for name in names if name not in needed]
        stray = next((name for name in foreign if getattr(self, name) is not None), None)
        if stray is not None:
            raise ValueError(f"{stray} is not a field of a {self.type} item")
        return self


class FunctionTool(BaseModel):
    """An entry of `tools`, in the Responses API's flat shape; vendor fields are ignored, as chat's tools do."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["function"]
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionChoice(BaseModel):
    """`tool_choice: {"type": "function", "name": ...}`: this function must be called."""

    model_config = REQUEST_CONFIG

    type: Literal["function"]
    name: str


class TextFormat(BaseModel):
    """`text.format`: free text, any JSON object, or JSON matching a named schema."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, populate_by_name=True)

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(None, min_length=1, max_length=64)
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_with_json_schema(self) -> TextFormat:
        if self.type == "json_schema" and (self.name is None or self.schema_ is None):
            raise ValueError("a json_schema format needs a name and a schema")
        if self.type != "json_schema" and (self.name is not None or self.schema_ is not None):
            raise ValueError(f"a {self.type} format takes no name or schema")
        return self

    @model_serializer(mode="wrap")
    def _drop_absent(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if value is not None}


class TextConfig(BaseModel):
    """`text`: the format of the answer."""

    model_config = REQUEST_CONFIG

    format: TextFormat = Field(default_factory=lambda: TextFormat(type="text"))


class ResponsesRequest(BaseModel):
    """Body of `POST /v1/responses`; a field not declared here is refused (400)."""

    model_config = REQUEST_CONFIG

    model: str
    input: Annotated[list[InputItem], BeforeValidator(_user_message), Field(min_length=1), Bounded("max_messages"),
                     OrString()]  # fmt: skip
    instructions: str | None = Field(None, description="sent to the chat template as a first system message")
    max_output_tokens: TokenCount | None = None
    stream: bool | None = False
    text: TextConfig | None = None
    tools: list[FunctionTool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool | None = Field(None, description='false: "required" makes exactly one call')

    # Sampling, as chat completions take it (vLLM's extras included).
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: TopK | None = None
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    seed: Seed | None = None
    min_tokens: MinTokens = 0
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, ge=0.01, le=10.0)

    # Echoed in the response and otherwise ignored.
    metadata: Metadata | None = None
    user: str | None = None
    service_tier: ServiceTier | None = None

    # What a server that stores nothing and never truncates cannot do: only the neutral values pass.
    store: Annotated[bool | None, tolerated(False, None)] = None
    previous_response_id: Annotated[str | None, tolerated(None)] = None
    truncation: Annotated[Literal["auto", "disabled"] | None, tolerated("disabled", None)] = None
    include: Annotated[list[str] | None, tolerated(schema=EMPTY_LIST_OR_NULL)] = None

    @field_validator("store")
    @classmethod
    def _not_stored(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError(f"true is not supported: {NOT_STORED}")
        return value

    @field_validator("previous_response_id")
    @classmethod
    def _no_previous(cls, value: str | None) -> str | None:
        if value is not None:
            raise ValueError(f"{NOT_SUPPORTED}: {NOT_STORED}")
        return value

    @field_validator("truncation")
    @classmethod
    def _never_truncated(cls, value: str | None) -> str | None:
        if value == "auto":
            raise ValueError('"auto" is not supported: input over the context is refused, never cut; send "disabled"')
        return value

    @field_validator("include")
    @classmethod
    def _nothing_included(cls, value: list[str] | None) -> list[str] | None:
        if value:
            raise ValueError(f"{NOT_SUPPORTED}: send an empty list")
        return value
