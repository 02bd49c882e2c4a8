"""Field types for request bodies: JSON numbers as JSON Schema reads them, and fields the server only tolerates or
accepts without effect.

A request model is strict (no `"3"` for 3, no `"yes"` for true), but JSON Schema calls `3.0` an integer, so the
integer fields here take integral floats too: generated clients and fuzzers agree with the server.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, Strict, WithJsonSchema
from pydantic_core import PydanticCustomError

from server.api.limits import exact
from server.engine.logprobs import MAX_TOP_LOGPROBS

MAX_INT32 = 2**31 - 1  # token counts and top_k: far beyond any context, still a machine integer
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # seeds: what a generator takes


def _number_only(value: object) -> object:
    if isinstance(value, (str, bytes, bool)):
        raise PydanticCustomError("int_type", "Input should be a valid integer")
    return value


def json_int(ge: int, le: int) -> Any:
    """An integer within [ge, le], written as a JSON integer or an integral number (3 or 3.0), never a string."""
    return Annotated[
        int,
        Strict(False),
        Field(ge=ge, le=le, json_schema_extra=exact(minimum=ge, maximum=le)),
        BeforeValidator(_number_only),
    ]


def tolerated(*values: Any, schema: dict[str, Any] | None = None) -> WithJsonSchema:
    """The JSON schema of a field the server does not implement: only its neutral values are accepted.

    The field's validator refuses anything else with a 400 ("not supported"); this keeps /openapi.json honest.
    """
    return WithJsonSchema(schema or {"enum": list(values), "description": "not supported: only these values"})


# OpenAI's limits on `metadata`, which it stores with a completion (and this server ignores).
MAX_METADATA_KEYS, MAX_METADATA_KEY_CHARS, MAX_METADATA_VALUE_CHARS = 16, 64, 512
Metadata = Annotated[
    dict[
        Annotated[str, Field(max_length=MAX_METADATA_KEY_CHARS)],
        Annotated[str, Field(max_length=MAX_METADATA_VALUE_CHARS)],
    ],
    Field(max_length=MAX_METADATA_KEYS, description="accepted and ignored: string values under string keys"),
]
ServiceTier = Literal["auto", "default", "flex", "scale", "priority"]

MAX_N = 1024  # the ceiling of --max-n
Count = json_int(1, MAX_N)
TokenCount = json_int(1, MAX_INT32)
TokenCountOrZero = json_int(0, MAX_INT32)
TopLogprobs = json_int(0, MAX_TOP_LOGPROBS)
MinTokens = json_int(0, MAX_INT32)
TopK = json_int(-1, MAX_INT32)
Seed = json_int(INT64_MIN, INT64_MAX)
TokenId = json_int(0, MAX_INT32)
