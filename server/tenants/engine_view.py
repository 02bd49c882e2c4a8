"""The engine as one tenant sees it: a model outside the tenant's scope does not exist, and its tokens are counted.

The view has exactly the members the tenant-facing routes (/v1, /tokenize, /detokenize) use, and no others: the
ones that name a model are scoped, the ones that cannot reach an adapter are passed on. A route that needs one more
member adds it here, and so decides whether it needs scoping; until then it gets an AttributeError, never the
engine's unscoped member.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

from server.engine.outputs import ModelCard, RequestOutput
from server.errors import model_not_found
from server.tenants.scope import Scope

if TYPE_CHECKING:
    from server.engine.async_engine import AsyncEngine
    from server.engine.sequence import SamplingParams

TokenCounter = Callable[[int], None]  # called with the number of newly generated tokens


class PassedOn:
    """A member of the engine that names no model (a tokenizer call, a limit), passed on to the tenant as it is."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, view: TenantEngine | None, owner: type | None = None) -> Any:
        return self if view is None else getattr(view._engine, self.name)


class TenantEngine:
    """Wraps the engine facade for one request of one tenant, with only the members the tenant-facing routes use."""

    def __init__(self, engine: AsyncEngine, scope: Scope, on_tokens: TokenCounter | None = None) -> None:
        self._engine = engine
        self._scope = scope
        self._on_tokens = on_tokens

    max_model_len = PassedOn()
    vocab_size = PassedOn()
    chat_template = PassedOn()
    encode_prompt = PassedOn()
    encode_chat = PassedOn()
    decode = PassedOn()
    decode_tokens = PassedOn()
    compile_grammar = PassedOn()
    plan = PassedOn()  # a sampling request and prompts to jobs: no model in it

    def list_models(self) -> list[ModelCard]:
        """The engine's models that the tenant may use (adapters added later included, if their names match)."""
        return [card for card in self._engine.list_models() if self._visible(card.name)]

    def resolve_adapter(self, model: str) -> str | None:
        """As the engine's, but a model outside the scope gets the very error of a model that does not exist.

        The adapter the engine resolves is checked too, so an engine (or a case-insensitive file system) that maps
        an in-scope spelling onto another tenant's adapter cannot widen the scope.
        """
        if not self._visible(model):
            raise model_not_found(model)
        adapter = self._engine.resolve_adapter(model)
        if adapter is not None and not self._scope.allows_adapter(adapter):
            raise model_not_found(model)
        return adapter

    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, adapter: str | None, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """The engine's stream, counting each output's new tokens as it passes; an adapter outside the scope (one
        that did not come from `resolve_adapter`) is refused as a missing model."""
        if adapter is not None and not self._scope.allows_adapter(adapter):
            raise model_not_found(adapter)
        counted = 0
        async with aclosing(self._engine.generate(prompt_token_ids, params, adapter, request_id)) as outputs:
            async for output in outputs:
                if self._on_tokens is not None:
                    self._on_tokens(output.num_output_tokens - counted)
                counted = output.num_output_tokens
                yield output

    def _visible(self, model: str) -> bool:
        return self._scope.allows(model, is_base=model == self._engine.served_model_name)
