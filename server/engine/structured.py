"""Structured outputs with llguidance: a grammar per request, a token mask per constrained row per step.

A request's constraint (a JSON schema, any JSON object, a regex, a choice of strings or an EBNF/Lark grammar) is
compiled once per distinct constraint into a matcher kept in an LRU cache; each request runs on a copy of it.
Every step, the masks of the constrained rows only are computed on a helper thread while the forward runs
(llguidance releases the GIL), then those rows' disallowed logits are set to -inf. Unconstrained rows and steps
without constrained rows pay nothing.

JSON is generated in the layout of Python's `json.dumps` (", " and ": ", no other whitespace): a small model
given free whitespace can loop on newlines, and adapters trained on `json.dumps` output see what they learned. For
the same reason an object schema that does not say `additionalProperties` generates only its declared properties.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import llguidance
import llguidance.hf
import llguidance.torch
import torch

from server.engine.closed_objects import close_objects
from server.errors import InvalidRequestError

GrammarKind = Literal["json_schema", "json_object", "regex", "choice", "grammar"]
_JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_CACHE_SIZE = 256


@dataclass(frozen=True)
class GrammarSpec:
    """What a request's output must match: `text` is the schema (JSON), regex, choices (JSON list) or grammar."""

    kind: GrammarKind
    text: str
    param: str  # the request field it came from, named in errors

    @property
    def key(self) -> tuple[str, str]:
        return self.kind, self.text


def llguidance_grammar(spec: GrammarSpec) -> str:
    """The llguidance grammar for `spec`, not yet checked; raises InvalidRequestError on malformed input."""
    try:
        if spec.kind == "json_schema":
            return llguidance.LLMatcher.grammar_from_json_schema(spec.text, defaults=_JSON_LAYOUT)
        if spec.kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema('{"type": "object"}', defaults=_JSON_LAYOUT)
        if spec.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(spec.text)
        if spec.kind == "choice":
            return llguidance.grammar_from("choice", spec.text)
        return llguidance.grammar_from("grammar", spec.text)
    except ValueError as exc:
        raise InvalidRequestError(f"{spec.param}: {exc}", param=spec.param) from exc


def check_grammar(spec: GrammarSpec, tokenizer: llguidance.LLTokenizer | None = None) -> str:
    """The llguidance grammar for `spec` once it compiles; otherwise a 400 naming the problem."""
    grammar = llguidance_grammar(spec)
    problem = llguidance.LLMatcher.validate_grammar(grammar, tokenizer)
    if problem:
        raise InvalidRequestError(f"{spec.param} cannot be compiled: {problem.strip()}", param=spec.param)
    return grammar


class GrammarCompiler:
    """Compiles constraints against the model's tokenizer, caching one matcher per distinct constraint. Thread-safe."""

    def __init__(self, hf_tokenizer, vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        self._hf_tokenizer = hf_tokenizer
        self._vocab_size = vocab_size
        self._eos = list(eos_token_ids)
        self._tokenizer: llguidance.LLTokenizer | None = None  # built on first use: about a second
        self._cache: OrderedDict[tuple[str, str], llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, spec: GrammarSpec) -> llguidance.LLMatcher:
        """The cached matcher for `spec` (compiling it if new); raises InvalidRequestError if it cannot compile."""
        with self._lock:
            if spec.key in self._cache:
                self._cache.move_to_end(spec.key)
                return self._cache[spec.key]
            tokenizer = self._llg_tokenizer()
        matcher = llguidance.LLMatcher(tokenizer, check_grammar(spec, tokenizer), log_level=0)
        if matcher.is_error():
            raise InvalidRequestError(f"{spec.param} cannot be compiled: {matcher.get_error()}", param=spec.param)
        with self._lock:
            self._cache[spec.key] = matcher
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return matcher

    def start(self, spec: GrammarSpec) -> GrammarState:
        """A fresh matcher state for one request."""
        return GrammarState(self.compile(spec).deep_copy(), self._vocab_size)

    def _llg_tokenizer(self) -> llguidance.LLTokenizer:
        if self._tokenizer is None:
            self._tokenizer = llguidance.hf.from_tokenizer(self._hf_tokenizer, self._vocab_size, self._eos)
        return self._tokenizer


class GrammarState:
    """One request's position in its grammar."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size

    def accept(self, token: int) -> bool:
        """Advance by the sampled token; False if the grammar does not allow it (the request then fails)."""
        return self.matcher.consume_token(token)

    @property
    def error(self) -> str:
        return self.matcher.get_error()


class MaskBuilder:
    """Computes the constrained rows' token masks on a helper thread, so that they overlap the forward."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loraplex-grammar")
        self._executor = llguidance.LLExecutor(num_threads=2)

    def start(self, grammars: Sequence[GrammarState | None]) -> GrammarMasks | None:
        """Begin computing the masks of the rows with a grammar; None when no row has one."""
        rows = [i for i, g in enumerate(grammars) if g is not None]
        if not rows:
            return None
        states = [grammars[i] for i in rows]
        return GrammarMasks(rows, self._pool.submit(self._fill, states))  # type: ignore[arg-type]

    def _fill(self, states: list[GrammarState]) -> torch.Tensor:
        bitmask = llguidance.torch.allocate_token_bitmask(len(states), states[0].vocab_size)  # [G, ceil(V / 32)]
        matchers = [(state.matcher, i) for i, state in enumerate(states)]
        llguidance.torch.fill_next_token_bitmask_par(self._executor, matchers, bitmask)
        return bitmask

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)


@dataclass
class GrammarMasks:
    """The masks of one step's constrained rows, being computed."""

    rows: list[int]  # row indices of the step's sampled logits
    bitmask: Future[torch.Tensor]  # [G, ceil(V / 32)] int32, bit b of word w allows token 32 * w + b

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits: [L, V]` with disallowed tokens of the constrained rows at -inf (a copy)."""
        vocab = logits.shape[-1]
        bits = self.bitmask.result().to(logits.device, non_blocking=True)  # [G, W]
        shifts = torch.arange(32, dtype=torch.int32, device=logits.device)  # [32]
        allowed = ((bits[:, :, None] >> shifts) & 1).flatten(1)[:, :vocab].bool()  # [G, V]
        idx = torch.tensor(self.rows, device=logits.device)
        logits = logits.clone()
        logits[idx] = logits[idx].masked_fill(~allowed, float("-inf"))
        return logits


def spec_of_choices(choices: list[str], param: str) -> GrammarSpec:
    return GrammarSpec("choice", json.dumps(choices), param)


def spec_of_schema(schema: dict, param: str) -> GrammarSpec:
    """Keys keep their order: the order of `properties` is the order the keys are generated in. An object without
    `additionalProperties` generates only its declared properties (`server.engine.closed_objects`)."""
    return GrammarSpec("json_schema", json.dumps(close_objects(schema)), param)
