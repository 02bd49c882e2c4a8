"""HTTP layer: the OpenAI-compatible API over the engine facade."""

from server.api.app import create_app

__all__ = ["create_app"]
