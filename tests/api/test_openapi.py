"""/openapi.json tells the truth: each route's error statuses in the error shape, the admin security scheme, and
the bounds the server enforces with the values of its settings."""

from __future__ import annotations

import inspect

import httpx
import pytest
from fake_engine import FakeEngine

from server import errors
from server.api import create_app
from server.api.errors import HTTP_ERRORS, status_of
from server.settings import Settings

ERROR_REF = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}


@pytest.fixture
async def document(client: httpx.AsyncClient) -> dict:
    return (await client.get("/openapi.json")).json()


@pytest.mark.parametrize(
    ("method", "path", "statuses"),
    [
        ("post", "/v1/completions", {"200", "400", "404", "413", "422", "429", "500", "503"}),
        ("post", "/v1/chat/completions", {"200", "400", "404", "413", "422", "429", "500", "503"}),
        ("get", "/v1/models", {"200", "400", "500", "503"}),  # 400: a bad after/limit
        ("get", "/v1/models/{model}", {"200", "404", "500", "503"}),
        ("post", "/admin/adapters", {"201", "400", "401", "403", "409", "413", "415", "422", "429", "500", "503"}),
        ("patch", "/admin/adapters/{name}", {"200", "400", "401", "403", "404", "409", "413", "500", "503"}),
        ("delete", "/admin/adapters/{name}", {"200", "401", "403", "404", "500", "503"}),
    ],
)
async def test_every_status_is_declared_in_the_error_shape(document: dict, method: str, path: str, statuses: set):
    responses = document["paths"][path][method]["responses"]
    assert set(responses) == statuses
    assert all(responses[s]["content"] == ERROR_REF for s in statuses if int(s) >= 400)
    assert "HTTPValidationError" not in str(document)


async def test_retry_after_and_the_event_stream_are_declared(document: dict) -> None:
    completions = document["paths"]["/v1/completions"]["post"]["responses"]
    assert "Retry-After" in completions["429"]["headers"]
    assert set(completions["200"]["content"]) == {"application/json", "text/event-stream"}


async def test_admin_routes_declare_the_bearer_scheme(document: dict) -> None:
    assert document["components"]["securitySchemes"]["HTTPBearer"] == {
        "type": "http",
        "description": "The admin token the server was started with",
        "scheme": "bearer",
    }
    for operation in document["paths"]["/admin/adapters/{name}"].values():
        assert operation["security"] == [{"HTTPBearer": []}]


async def test_bounds_carry_the_settings_values_exactly(engine: FakeEngine) -> None:
    settings = Settings(max_prompts=5, max_n=3, max_stop_strings=2, max_stop_chars=9, max_text_chars=77)
    schemas = create_app(settings, lambda *_: engine).openapi()["components"]["schemas"]
    completion = schemas["CompletionRequest"]["properties"]
    prompt_forms = completion["prompt"]["anyOf"]
    assert [form.get("maxItems") for form in prompt_forms] == [None, 5, None, 5]
    assert prompt_forms[0]["maxLength"] == 77
    assert completion["n"]["anyOf"][0] == {"type": "integer", "minimum": 1, "maximum": 3}
    assert completion["seed"]["anyOf"][0] == {"type": "integer", "minimum": -(2**63), "maximum": 2**63 - 1}
    stop_list = completion["stop"]["anyOf"][1]
    assert (stop_list["maxItems"], stop_list["items"]["maxLength"]) == (2, 9)
    assert schemas["CompletionRequest"]["additionalProperties"] is False
    assert schemas["ChatMessage"]["properties"]["content"]["anyOf"][0]["maxLength"] == 77


def test_every_domain_error_has_a_status_and_configuration_errors_are_not_400() -> None:
    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass) if issubclass(c, errors.LoraplexError)]
    assert all(status_of(c) in range(400, 600) for c in classes)
    assert status_of(errors.ConfigurationError) == 500
    assert status_of(errors.InvalidRequestError) == 400 and status_of(errors.AdapterError) == 422
    assert set(HTTP_ERRORS) <= set(classes)
