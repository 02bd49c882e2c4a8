"""`chat_template_kwargs`: extra variables a chat request hands its chat template (vLLM's field), e.g.
`{"enable_thinking": false}` for Qwen3.

They reach the template as variables, never as the render's own arguments: a name the render takes itself (the
messages, the tools, tokenization...) is refused with a 400, as is an object too large to be a few switches.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import AfterValidator, Field

MAX_KEYS = 32
MAX_JSON_CHARS = 16 * 1024  # switches and short strings, not a second prompt

# The arguments of transformers' `apply_chat_template` and the variables its render sets itself.
RESERVED = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "sanitize_control_tokens", "padding", "truncation", "max_length",
    "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs", "raise_exception",
    "strftime_now",
})  # fmt: skip


def _check(value: dict[str, Any]) -> dict[str, Any]:
    reserved = sorted(RESERVED.intersection(value))
    if reserved:
        raise ValueError(f"{', '.join(reserved)} cannot be set here: the server sets the chat template's own arguments")
    size = len(json.dumps(value))
    if size > MAX_JSON_CHARS:
        raise ValueError(f"{size} characters of JSON, over the limit of {MAX_JSON_CHARS}")
    return value


ChatTemplateKwargs = Annotated[
    dict[str, Any],
    Field(max_length=MAX_KEYS, description='variables for the chat template, e.g. {"enable_thinking": false}'),
    AfterValidator(_check),
]
