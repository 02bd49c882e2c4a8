"""The json-extract task adapter, constrained by its own schema, still answers its held-out prompts correctly."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from server.engine.factory import build_engine
from server.engine.sequence import SamplingParams
from server.engine.structured import spec_of_schema
from server.settings import Settings
from training.evaluate import heldout
from training.tasks.json_extract import TASK

pytestmark = pytest.mark.slow

STORE = Path(__file__).resolve().parents[2] / "adapters_store"
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "city": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "city", "age"],
    "additionalProperties": False,
}


def test_json_extract_answers_held_out_prompts_under_its_schema(default_model_dir) -> None:
    engine = build_engine(Settings(adapters_store=STORE, kv_cache_bytes=64 * 2**20, dtype="float32"))
    examples = heldout(TASK, n=24)
    params = SamplingParams(max_tokens=48, temperature=0.0, structured=spec_of_schema(SCHEMA, "response_format"))

    async def one(i: int, prompt: str) -> str:
        ids = engine.encode_chat([{"role": "user", "content": prompt}])
        return "".join([out.text async for out in engine.generate(ids, params, "json-extract", f"j{i}")])

    async def burst() -> list[str]:
        return await asyncio.gather(*(one(i, e.prompt) for i, e in enumerate(examples)))

    try:
        outputs = asyncio.run(burst())
    finally:
        engine.shutdown()
    correct = sum(TASK.score(out, example) for out, example in zip(outputs, examples, strict=True))
    assert correct >= 0.9 * len(examples), list(zip(outputs, [e.answer for e in examples], strict=True))
