"""The tool-call formats by vLLM's `--tool-call-parser` names, and the choice `auto` makes from the chat template."""

from __future__ import annotations

import logging
from functools import lru_cache

from server.api.tool_parsers.base import ToolCallFormat
from server.api.tool_parsers.hermes import HermesFormat
from server.api.tool_parsers.llama3_json import LLAMA3_JSON, PYTHON_TAG
from server.api.tool_parsers.mistral import MISTRAL, TOOL_CALLS

log = logging.getLogger(__name__)

FORMATS: dict[str, ToolCallFormat] = {format.name: format for format in (HermesFormat(), LLAMA3_JSON, MISTRAL)}
# What `auto` reads when the template names no single format: Hermes blocks, which the server always read (the
# default SmolLM2 template renders no tools at all).
DEFAULT_FORMAT = "hermes"

# What a chat template that asks for a format writes into its instructions or its rendering of earlier calls.
_TEMPLATE_SIGNS: dict[str, tuple[str, ...]] = {
    "hermes": ("<tool_call>",),
    "llama3_json": (PYTHON_TAG, '{"name": function name, "parameters"'),
    "mistral": (TOOL_CALLS,),
}


def detect_format(template: str | None) -> str | None:
    """The one format the chat template shows signs of, or None when it shows none or several."""
    if not isinstance(template, str):
        return None
    found = [name for name, signs in _TEMPLATE_SIGNS.items() if any(sign in template for sign in signs)]
    return found[0] if len(found) == 1 else None


@lru_cache(maxsize=16)
def choose_tool_format(setting: str, template: str | None) -> ToolCallFormat:
    """The format `--tool-call-parser` names; for `auto`, the one the template shows, else the default. Logged once
    per choice (the chat template is the same object on every request, so the cache hits)."""
    if setting != "auto":
        log.info("tool-call parser: %s (--tool-call-parser)", setting)
        return FORMATS[setting]
    detected = detect_format(template)
    why = "the chat template's format" if detected else "the default: the chat template shows no single format"
    log.info("tool-call parser: %s (%s)", detected or DEFAULT_FORMAT, why)
    return FORMATS[detected or DEFAULT_FORMAT]
