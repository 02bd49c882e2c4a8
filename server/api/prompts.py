"""The text a request carries: the four OpenAI prompt forms, chat content parts and stop strings.

Each is a field type with its validator, its bounds (`server.api.limits`) and its JSON schema: the validators accept
more shapes than pydantic's types say (a string where a list is meant), so the schema is written out.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BeforeValidator, Field, WithJsonSchema
from pydantic_core import PydanticCustomError

from server.api.fields import MAX_INT32
from server.api.limits import LIMIT_KEY, Bounded, bound, flag


def _as_stop_list(value: object) -> object:
    return [value] if isinstance(value, str) else value


def _is_token_id(value: object) -> bool:
    # JSON Schema's integers include 3.0; they are taken as 3
    return (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, float) and value.is_integer())


def _is_token_ids(value: object) -> bool:
    return isinstance(value, list) and all(map(_is_token_id, value))


def _is_prompt_batch(value: object) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and (all(isinstance(p, str) for p in value) or all(map(_is_token_ids, value)))
    )


def _as_prompt_list(value: object) -> list[str] | list[list[int]]:
    """Normalise the four OpenAI prompt forms to a list of prompts, one per choice index."""
    if isinstance(value, str) or _is_token_ids(value):
        prompts: list = [value]
    elif _is_prompt_batch(value):
        prompts = value
    else:
        raise PydanticCustomError(
            "prompt_type", "must be a string, a list of strings, a list of token ids or a list of token-id lists"
        )
    if any(len(p) == 0 for p in prompts):
        raise ValueError("must not be empty")
    if any(not 0 <= t <= MAX_INT32 for p in prompts if isinstance(p, list) for t in p):
        raise ValueError(f"token ids must be between 0 and {MAX_INT32}")
    if isinstance(prompts[0], list):
        prompts = [[int(t) for t in p] for p in prompts]
    longest = max(len(p) for p in prompts if isinstance(p, str)) if isinstance(prompts[0], str) else 0
    if longest > bound("max_text_chars"):
        raise ValueError(
            f"a prompt of {longest} characters is over the limit of {bound('max_text_chars')} "
            f"(the server's {flag('max_text_chars')})"
        )
    return prompts


def _join_text_parts(value: object) -> object:
    """Chat content may be a list of `{"type": "text", "text": ...}` parts; join them like vLLM does."""
    if not isinstance(value, list):
        return value
    if not all(isinstance(p, dict) and p.keys() == {"type", "text"} and p["type"] == "text" for p in value):
        raise ValueError("content parts must be objects with only type 'text' and a 'text' string")
    if not all(isinstance(p["text"], str) for p in value):
        raise PydanticCustomError("string_type", "the 'text' of a content part must be a string")
    return "\n".join(p["text"] for p in value)


StopList = Annotated[
    list[Annotated[str, Field(min_length=1), Bounded("max_stop_chars")]],
    BeforeValidator(_as_stop_list),
    Bounded("max_stop_strings"),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "minLength": 1, LIMIT_KEY: "max_stop_chars"},
                {
                    "type": "array",
                    "items": {"type": "string", "minLength": 1, LIMIT_KEY: "max_stop_chars"},
                    LIMIT_KEY: "max_stop_strings",
                },
            ]
        }
    ),
]


_TOKEN_IDS = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0, "maximum": MAX_INT32}}
_TEXT = {"type": "string", "minLength": 1, LIMIT_KEY: "max_text_chars"}
PROMPT_SCHEMA = {  # the four OpenAI forms, which the validator normalises to a list of prompts
    "anyOf": [
        _TEXT,
        {"type": "array", "minItems": 1, "items": _TEXT, LIMIT_KEY: "max_prompts"},
        _TOKEN_IDS,
        {"type": "array", "minItems": 1, "items": _TOKEN_IDS, LIMIT_KEY: "max_prompts"},
    ]
}
PromptList = Annotated[
    list[str] | list[list[int]], BeforeValidator(_as_prompt_list), Bounded("max_prompts"), WithJsonSchema(PROMPT_SCHEMA)
]


_TEXT_PART = {
    "type": "object",
    "required": ["type", "text"],
    "properties": {"type": {"const": "text"}, "text": {"type": "string", LIMIT_KEY: "max_text_chars"}},
    "additionalProperties": False,
}
CONTENT_SCHEMA = {  # a string, or text parts joined with newlines
    "anyOf": [{"type": "string", LIMIT_KEY: "max_text_chars"}, {"type": "array", "items": _TEXT_PART}]
}
ChatContent = Annotated[
    str, BeforeValidator(_join_text_parts), Bounded("max_text_chars"), WithJsonSchema(CONTENT_SCHEMA)
]
