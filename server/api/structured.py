"""From a request's `response_format` / `structured_outputs` to the engine's GrammarSpec, refusing what cannot work."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from starlette.concurrency import run_in_threadpool

from server.api.schemas import GenerationRequest
from server.api.tools import tool_schema
from server.engine.structured import GrammarSpec, spec_of_choices, spec_of_schema
from server.errors import InvalidRequestError

if TYPE_CHECKING:
    from server.api.structured_schemas import ResponseFormat, StructuredOutputs
    from server.engine.async_engine import AsyncEngine


async def compiled_grammar(engine: AsyncEngine, body: GenerationRequest) -> GrammarSpec | None:
    """The output constraint, compiled (or found in the cache) off the event loop before anything is queued."""
    spec = grammar_spec(body)
    if spec is not None:
        await run_in_threadpool(engine.compile_grammar, spec)
    return spec


def grammar_spec(body: GenerationRequest) -> GrammarSpec | None:
    """The request's output constraint, or None; a 400 for contradictory or incomplete ones."""
    tools = tool_schema(body)
    candidates = (_from_response_format(body.response_format), _from_extras(body.structured_outputs),
                  None if tools is None else spec_of_schema(tools, "tools"))  # fmt: skip
    specs = [spec for spec in candidates if spec is not None]
    if not specs:
        return None
    if len(specs) > 1:
        raise InvalidRequestError("send only one of response_format, structured_outputs and a forced tool_choice",
                                  param=specs[0].param.split(".")[0])  # fmt: skip
    (spec,) = specs
    if body.min_tokens or body.ignore_eos:
        field = "min_tokens" if body.min_tokens else "ignore_eos"
        raise InvalidRequestError(f"{field} cannot be combined with structured outputs, which end when the "
                                  "output is complete", param=field)  # fmt: skip
    return spec


def _from_response_format(response_format: ResponseFormat | None) -> GrammarSpec | None:
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return GrammarSpec("json_object", "", "response_format")
    if response_format.json_schema is None:
        raise InvalidRequestError("response_format of type json_schema needs a json_schema object with a schema",
                                  param="response_format.json_schema")  # fmt: skip
    return spec_of_schema(response_format.json_schema.schema_, "response_format.json_schema.schema")


def _from_extras(extras: StructuredOutputs | None) -> GrammarSpec | None:
    if extras is None:
        return None
    given = [name for name, value in extras.model_dump(by_alias=True).items() if value not in (None, False)]
    if len(given) != 1:
        raise InvalidRequestError(f"structured_outputs must set exactly one constraint, got {given or 'none'}",
                                  param="structured_outputs")  # fmt: skip
    param = f"structured_outputs.{given[0]}"
    if extras.json_ is not None:
        schema = extras.json_ if isinstance(extras.json_, dict) else _parse_schema(extras.json_, param)
        return spec_of_schema(schema, param)
    if extras.json_object:
        return GrammarSpec("json_object", "", param)
    if extras.regex is not None:
        return GrammarSpec("regex", extras.regex, param)
    if extras.choice is not None:
        return spec_of_choices(extras.choice, param)
    return GrammarSpec("grammar", extras.grammar or "", param)


def _parse_schema(text: str, param: str) -> dict:
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(f"{param} is not valid JSON: {exc}", param=param) from exc
    if not isinstance(schema, dict):
        raise InvalidRequestError(f"{param} must be a JSON schema object", param=param)
    return schema
