"""The engine as one tenant sees it: a model outside the tenant's scope does not exist, and its tokens are counted."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

from server.engine.outputs import ModelCard, RequestOutput
from server.errors import model_not_found
from server.tenants.scope import Scope

if TYPE_CHECKING:
    from server.engine.async_engine import AsyncEngine

TokenCounter = Callable[[int], None]  # called with the number of newly generated tokens


class TenantEngine:
    """Wraps the engine facade for one request of one tenant; everything not scoped here is the engine's own."""

    def __init__(self, engine: AsyncEngine, scope: Scope, on_tokens: TokenCounter | None = None) -> None:
        self._engine = engine
        self._scope = scope
        self._on_tokens = on_tokens

    def __getattr__(self, name: str) -> Any:
        # Routes use the facade's other members (tokenizer, limits, ...) as they are: only models need scoping.
        return getattr(self._engine, name)

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

    async def generate(self, *args: Any, **kwargs: Any) -> AsyncIterator[RequestOutput]:
        """The engine's stream (same arguments), counting each output's new tokens as it passes."""
        counted = 0
        async with aclosing(self._engine.generate(*args, **kwargs)) as outputs:
            async for output in outputs:
                if self._on_tokens is not None:
                    self._on_tokens(output.num_output_tokens - counted)
                counted = output.num_output_tokens
                yield output

    def _visible(self, model: str) -> bool:
        return self._scope.allows(model, is_base=model == self._engine.served_model_name)
