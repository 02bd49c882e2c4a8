"""Structured outputs on the engine: every constrained output parses and validates at temperature 1, mixed with
unconstrained requests and adapters whose tokens stay exactly what they are alone; bad constraints are refused."""

from __future__ import annotations

import asyncio
import json
import re

import jsonschema
import pytest

from server.engine.factory import build_engine
from server.engine.sequence import FinishReason, SamplingParams
from server.engine.structured import GrammarSpec, check_grammar, spec_of_choices, spec_of_schema
from server.errors import InvalidRequestError
from server.settings import Settings
from tests.helpers import make_adapter_store

SHORT = {"type": "string", "maxLength": 6}
SCHEMAS = [
    {"type": "object", "properties": {"name": SHORT, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": SHORT, "minItems": 1, "maxItems": 3}},
     "required": ["tags"], "additionalProperties": False},
    {"type": "object", "properties": {"mood": {"enum": ["happy", "sad", "neutral"]}, "ok": {"type": "boolean"}},
     "required": ["mood", "ok"], "additionalProperties": False},
    {"type": "object", "properties": {"person": {"type": "object", "properties": {"id": {"type": "integer"},
     "email": SHORT}, "required": ["id"], "additionalProperties": False}, "scores": {"type": "array", "items":
     {"type": "number"}, "maxItems": 2}}, "required": ["person", "scores"], "additionalProperties": False},
]  # fmt: skip
ADAPTERS = {"lora": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])}


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tmp_path_factory):
    store = make_adapter_store(tiny_model_dir, tmp_path_factory.mktemp("store"), ADAPTERS)
    engine = build_engine(Settings(model=tiny_model_dir, adapters_store=store, kv_cache_bytes=2**21, block_size=4))
    yield engine
    engine.shutdown()


def _run(engine, jobs: list[tuple[str | None, list[int], SamplingParams]]) -> list[tuple[list[int], str, FinishReason]]:
    async def one(i, adapter, prompt, params):
        outs = [out async for out in engine.generate(prompt, params, adapter, f"s{i}")]
        return [t for o in outs for t in o.token_ids], "".join(o.text for o in outs), outs[-1].finish_reason

    async def burst():
        return await asyncio.gather(*(one(i, *job) for i, job in enumerate(jobs)))

    return asyncio.run(burst())


def _prompt(i: int) -> list[int]:
    return [3 + (17 * i + 3 * j) % 250 for j in range(4 + i % 5)]


def test_every_schema_output_validates_at_temperature_one_in_a_mixed_batch(engine) -> None:
    plain = [(None, _prompt(90), SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)),
             ("lora", _prompt(91), SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))]  # fmt: skip
    alone = _run(engine, plain)
    jobs = [
        (["lora", None][seed % 2], _prompt(seed), SamplingParams(max_tokens=120, seed=seed, structured=spec_of_schema(
            schema, "response_format")))
        for seed, schema in enumerate(SCHEMAS * 3)
    ]  # fmt: skip
    results = _run(engine, [*jobs, *plain])
    for (_, _, params), (_, text, reason) in zip(jobs, results, strict=False):
        assert reason is FinishReason.STOP, text
        jsonschema.validate(json.loads(text), json.loads(params.structured.text))
    assert [r[0] for r in results[len(jobs) :]] == [r[0] for r in alone]  # unconstrained rows are untouched


def test_json_object_regex_choice_and_grammar(engine) -> None:
    specs = [
        GrammarSpec("json_object", "", "response_format"),
        GrammarSpec("regex", r"[a-c]{2,4}-\d{3}", "structured_outputs.regex"),
        spec_of_choices(["yes", "no", "maybe"], "structured_outputs.choice"),
        GrammarSpec("grammar", 'root ::= "(" [0-9]+ ("+" [0-9]+)* ")"', "structured_outputs.grammar"),
    ]
    # A random model writes strings of random length: a bias towards closing them ends the JSON object sooner.
    closers = tuple((engine.tokenizer.encode(c, add_special_tokens=False)[0], 4.0) for c in '"}')
    jobs = [(None, _prompt(i), SamplingParams(max_tokens=200, seed=i, structured=spec, logit_bias=closers))
            for i, spec in enumerate(specs)]  # fmt: skip
    results = _run(engine, jobs)
    assert all(reason is FinishReason.STOP for _, _, reason in results)
    (obj, regex, choice, grammar) = [text for _, text, _ in results]
    assert isinstance(json.loads(obj), dict)
    assert re.fullmatch(r"[a-c]{2,4}-\d{3}", regex)
    assert choice in ("yes", "no", "maybe")
    assert re.fullmatch(r"\(\d+(\+\d+)*\)", grammar)


def test_an_object_that_does_not_say_additional_properties_generates_only_its_own(engine) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}}
    # A bias towards "," asks a random model for more keys, and towards '"' to end its strings.
    more = tuple((engine.tokenizer.encode(c, add_special_tokens=False)[0], 4.0) for c in '",')
    closed, as_written = spec_of_schema(schema, "response_format"), GrammarSpec("json_schema", json.dumps(schema), "x")
    jobs = [(None, _prompt(i), SamplingParams(max_tokens=80, seed=i, structured=spec, logit_bias=more))
            for spec in (closed, as_written) for i in range(12)]  # fmt: skip
    results = _run(engine, jobs)
    assert all(reason is FinishReason.STOP and set(json.loads(text)) <= {"city"} for _, text, reason in results[:12])
    # Compiled as written, the same schema lets the model wander into keys nobody asked for (or run out of tokens).
    assert any(reason is not FinishReason.STOP or set(json.loads(text)) - {"city"} for _, text, reason in results[12:])


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        (spec_of_schema({"type": "object", "properties": {"a": {"type": "strin"}}}, "response_format"), "strin"),
        (GrammarSpec("json_schema", "[1, 2]", "response_format"), "response_format"),
        (GrammarSpec("regex", "a(b", "structured_outputs.regex"), "unclosed group"),
        (GrammarSpec("grammar", "root ::= missing_rule", "structured_outputs.grammar"), "missing_rule"),
    ],
)
def test_uncompilable_constraints_are_refused_with_the_problem(engine, spec: GrammarSpec, problem: str) -> None:
    with pytest.raises(InvalidRequestError, match=problem) as error:
        engine.compile_grammar(spec)
    assert error.value.param == spec.param
    with pytest.raises(InvalidRequestError):
        check_grammar(spec)


def test_compiled_grammars_are_cached_by_constraint(engine) -> None:
    grammars = engine.core.grammars
    first = grammars.compile(spec_of_schema(SCHEMAS[0], "a"))
    assert grammars.compile(spec_of_schema(SCHEMAS[0], "b")) is first
    assert grammars.compile(spec_of_schema(SCHEMAS[1], "a")) is not first
