"""Structured outputs under load: what constrained requests cost themselves and the requests next to them.

Each round runs two cases back to back on the default model, all requests submitted at once:
  plain   N unconstrained requests (prompt P tokens, exactly T output tokens, EOS ignored)
  mixed   the same N requests, of which K now carry a `json_schema` constraint (an array of records, so their
          answers run to about T tokens too; they end when the JSON is complete)
Reported (median over rounds, cases paired within a round so drift cancels):
  unconstrained throughput ratio  tokens/s of the N-K requests that stay unconstrained, mixed / plain (target >= 0.95)
  constrained TPOT ratio          median time per output token of the K constrained requests / of the unconstrained
                                  ones, in the mixed case (target <= 1.3)
The grammar is compiled once before the first round (compiled grammars are cached), as a server does on the
first request with a schema.

Usage: .venv/bin/python -m bench.bench_structured [--requests 32 --constrained 8 --prompt-len 64 --max-tokens 128]
Smoke: .venv/bin/python -m bench.bench_structured --requests 4 --constrained 1 --max-tokens 8 --rounds 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass

from bench.common import paired_ratio, random_prompt
from server.engine.factory import build_engine
from server.engine.sequence import FinishReason, SamplingParams
from server.engine.structured import spec_of_schema
from server.settings import Settings

RECORD = {
    "type": "object",
    "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 9999},
                   "name": {"type": "string", "maxLength": 12}, "active": {"type": "boolean"}},
    "required": ["id", "name", "active"],
    "additionalProperties": False,
}  # fmt: skip


def schema(max_tokens: int) -> dict:
    """An array of records sized so that a complete answer takes about `max_tokens` tokens (~12 per record)."""
    items = max(1, max_tokens // 12)
    return {"type": "object", "properties": {"records": {"type": "array", "items": RECORD, "minItems": items,
            "maxItems": items}}, "required": ["records"], "additionalProperties": False}  # fmt: skip


@dataclass
class Timing:
    """One request's output token count and the times its first and last tokens arrived."""

    constrained: bool
    tokens: int = 0
    first: float = 0.0
    last: float = 0.0
    finish: FinishReason | None = None

    @property
    def tpot(self) -> float:
        return (self.last - self.first) / max(self.tokens - 1, 1)


async def run_case(engine, prompts: list[list[int]], params: list[SamplingParams], tag: str) -> list[Timing]:
    async def one(i: int) -> Timing:
        timing, text = Timing(params[i].structured is not None), ""
        async for out in engine.generate(prompts[i], params[i], None, f"{tag}-{i}"):
            now = time.perf_counter()
            if out.token_ids and not timing.tokens:
                timing.first = now
            timing.tokens += len(out.token_ids)
            timing.last, text = now, text + out.text
            timing.finish = out.finish_reason
        if timing.constrained and timing.finish is FinishReason.STOP:
            json.loads(text)  # a complete constrained answer always parses; a failure here is a bug
        return timing

    return await asyncio.gather(*(one(i) for i in range(len(prompts))))


def unconstrained_throughput(timings: list[Timing], start: float, measured: list[int]) -> float:
    """Tokens/s of the requests at `measured`, up to the last of them finishing."""
    return sum(timings[i].tokens for i in measured) / (max(timings[i].last for i in measured) - start)


def round_figures(engine, prompts, free: SamplingParams, mixed: list[SamplingParams], r: int) -> tuple[float, ...]:
    """One round: (plain unconstrained tok/s, mixed unconstrained tok/s, constrained TPOT, unconstrained TPOT)."""
    constrained = [i for i, p in enumerate(mixed) if p.structured is not None]
    measured = [i for i, p in enumerate(mixed) if p.structured is None]
    start = time.perf_counter()
    plain_timings = asyncio.run(run_case(engine, prompts, [free] * len(prompts), f"plain{r}"))
    plain_rate = unconstrained_throughput(plain_timings, start, measured)
    start = time.perf_counter()
    mixed_timings = asyncio.run(run_case(engine, prompts, mixed, f"mixed{r}"))
    mixed_rate = unconstrained_throughput(mixed_timings, start, measured)
    tpot_c = statistics.median(mixed_timings[i].tpot for i in constrained)
    tpot_u = statistics.median(mixed_timings[i].tpot for i in measured)
    lengths = sorted(mixed_timings[i].tokens for i in constrained)
    cut = sum(mixed_timings[i].finish is FinishReason.LENGTH for i in constrained)
    print(f"round {r}: unconstrained {plain_rate:.1f} -> {mixed_rate:.1f} tok/s; TPOT constrained "
          f"{1e3 * tpot_c:.1f} ms, unconstrained {1e3 * tpot_u:.1f} ms; constrained lengths {lengths} ({cut} cut)",
          flush=True)  # fmt: skip
    return plain_rate, mixed_rate, tpot_c, tpot_u


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--constrained", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    engine = build_engine(Settings(max_num_seqs=max(args.requests, 32)))
    rng = random.Random(0)
    prompts = [random_prompt(rng, args.prompt_len, engine.vocab_size) for _ in range(args.requests)]
    spec = spec_of_schema(schema(args.max_tokens), "response_format")
    engine.compile_grammar(spec)
    free = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    bounded = SamplingParams(max_tokens=4 * args.max_tokens + 32, temperature=0.0, structured=spec)  # room to finish
    stride = max(1, args.requests // max(args.constrained, 1))  # constrained requests spread over the batch
    constrained = set(range(0, args.requests, stride)[: args.constrained])
    mixed = [bounded if i in constrained else free for i in range(args.requests)]
    try:
        rounds = [round_figures(engine, prompts, free, mixed, r) for r in range(args.rounds)]
    finally:
        engine.shutdown()
    ratio = paired_ratio([m for _, m, _, _ in rounds], [p for p, _, _, _ in rounds])
    print(f"unconstrained throughput, mixed / plain: {ratio:.3f} (target >= 0.95)")
    print(f"TPOT, constrained / unconstrained: {statistics.median(c / u for _, _, c, u in rounds):.3f} (target <= 1.3)")


if __name__ == "__main__":
    main()
