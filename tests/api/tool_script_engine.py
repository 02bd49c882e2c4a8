"""An echo engine scripted to use tools as an agent's model does: it calls a tool, then answers with its result."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from fake_engine import FakeEngine


@dataclass
class ToolScriptEngine(FakeEngine):
    """The echo engine whose chat template, given tools, renders the reply the script wants next (which the echo
    model then says): a `<tool_call>` of the first tool with `{"city": <the last user message>}`, or, once a tool
    message is last, a sentence quoting it. Without tools it is the plain echo engine. `conversations` holds the
    messages of every rendering with tools."""

    max_model_len: int = 1024
    conversations: list[list[dict[str, Any]]] = field(default_factory=list)

    def encode_chat(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        add_special_tokens: bool = False,
        tools: list[dict] | None = None,
        **kwargs: Any,
    ) -> list[int]:
        if not tools:
            return super().encode_chat(messages, add_generation_prompt, add_special_tokens, **kwargs)
        self.conversations.append(messages)
        last = messages[-1]
        if last["role"] == "tool":
            return self.encode_prompt(f"It is {last['content']} there.")
        call = {"name": tools[0]["function"]["name"], "arguments": {"city": last["content"]}}
        return self.encode_prompt(f"<tool_call>{json.dumps(call)}</tool_call>")
