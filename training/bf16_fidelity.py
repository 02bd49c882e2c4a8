"""The shipped task adapters served in bfloat16: held-out scores, and greedy agreement with PEFT run in bfloat16.

    python -m training.bf16_fidelity                          # every held-out prompt (minutes)
    python -m training.bf16_fidelity --per-task 3 --max-new-tokens 16

Our engine runs in-process with `--dtype bfloat16`, every prompt of every task in flight together (so the batches
and their rounding are those of a busy server). PEFT runs one prompt at a time with base and adapter cast to
bfloat16. Where the two greedy outputs differ, the first differing step is a *near-tie* when PEFT's top-2 logit
gap there is below `NEAR_TIE_ULPS` units in the last place of bf16 at the top logit's magnitude: a logit is the
output of a bf16 GEMM over bf16 activations, so two implementations that sum in a different order (oneDNN vs
ATen kernels, batch 1 vs a packed batch) disagree by a few of its ulps.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from peft import PeftModel

from training.evaluate import heldout
from training.model import load_base, prompt_ids
from training.tasks import TASKS, Task

NEAR_TIE_ULPS = 4  # bf16 keeps 8 significant bits: one ulp of a logit in [16, 32) is 0.125, so 4 ulps = 0.5


def bf16_ulp(value: float) -> float:
    """The spacing of bfloat16 numbers at |value|: 2^(e - 7) for 2^e <= |value| < 2^(e + 1)."""
    return 2.0 ** (math.floor(math.log2(max(abs(value), 2.0**-126))) - 7)


def near_tie_bound(top_logit: float) -> float:
    return NEAR_TIE_ULPS * bf16_ulp(top_logit)


@dataclass(frozen=True)
class PeftRun:
    """PEFT's greedy tokens, with the top logit and the top-2 gap of each step."""

    tokens: list[int]
    tops: list[float]
    gaps: list[float]


@dataclass(frozen=True)
class Agreement:
    """How our greedy output compares with PEFT's: the first differing step (None: identical) and PEFT's gap there."""

    step: int | None
    gap: float | None = None
    bound: float | None = None

    @property
    def near_tie(self) -> bool:
        return self.step is not None and self.gap is not None and self.gap < self.bound


def agreement(ours: Sequence[int], peft: PeftRun) -> Agreement:
    for step in range(max(len(ours), len(peft.tokens))):
        theirs = peft.tokens[step] if step < len(peft.tokens) else None
        if (ours[step] if step < len(ours) else None) != theirs:
            if step >= len(peft.gaps):
                return Agreement(step)
            return Agreement(step, peft.gaps[step], near_tie_bound(peft.tops[step]))
    return Agreement(None)


@torch.inference_mode()
def peft_greedy(model: torch.nn.Module, ids: list[int], max_new_tokens: int, eos: int) -> PeftRun:
    out = model.generate(
        input_ids=torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
        pad_token_id=eos, output_logits=True, return_dict_in_generate=True,
    )  # fmt: skip
    top2 = [step[0].float().topk(2).values for step in out.logits]  # [2] per step
    return PeftRun(
        out.sequences[0, len(ids) :].tolist(), [float(t[0]) for t in top2], [float(t[0] - t[1]) for t in top2]
    )


def peft_bf16(task: Task, store: Path, prompts: Sequence[list[int]], max_new_tokens: int) -> list[PeftRun]:
    base, tokenizer = load_base()
    model = PeftModel.from_pretrained(base, store / task.name).to(torch.bfloat16).eval()
    return [peft_greedy(model, ids, max_new_tokens, tokenizer.eos_token_id) for ids in prompts]


def engine_bf16(store: Path, jobs: Sequence[tuple[str, list[int], int]]) -> list[list[int]]:
    """Greedy tokens of every (adapter, prompt ids, max tokens) job, all in flight together in our bf16 engine."""
    from server.engine.factory import build_engine
    from server.engine.sequence import SamplingParams
    from server.settings import Settings

    settings = Settings(adapters_store=store, dtype="bfloat16", kv_cache_bytes=256 * 2**20, max_queue=len(jobs))
    engine = build_engine(settings)

    async def run() -> list[list[int]]:
        while not engine.is_ready():
            await asyncio.sleep(0.1)

        async def one(i: int, adapter: str, ids: list[int], max_tokens: int) -> list[int]:
            params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
            return [t async for out in engine.generate(ids, params, adapter, f"r{i}") for t in out.token_ids]

        return await asyncio.gather(*[one(i, *job) for i, job in enumerate(jobs)])

    try:
        return asyncio.run(run())
    finally:
        engine.shutdown()


def check(tasks: Sequence[Task], store: Path, per_task: int | None, max_new_tokens: int | None) -> dict[str, dict]:
    """Per task: held-out score of our bf16 outputs and their agreement with PEFT in bf16."""
    _, tokenizer = load_base()
    plans = {t.name: heldout(t)[:per_task] for t in tasks}
    limits = {t.name: min(t.max_new_tokens, max_new_tokens or t.max_new_tokens) for t in tasks}
    jobs = [(t.name, prompt_ids(tokenizer, e.prompt), limits[t.name]) for t in tasks for e in plans[t.name]]
    ours = iter(engine_bf16(store, jobs))
    results = {}
    for task in tasks:
        examples = plans[task.name]
        tokens = [next(ours) for _ in examples]
        prompts = [prompt_ids(tokenizer, e.prompt) for e in examples]
        peft = peft_bf16(task, store, prompts, limits[task.name])
        found = [agreement(o, p) for o, p in zip(tokens, peft, strict=True)]
        texts = [tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
        results[task.name] = {
            "total": len(examples),
            "score": sum(task.score(text, e) for text, e in zip(texts, examples, strict=True)),
            "identical": sum(a.step is None for a in found),
            "near_ties": sum(a.near_tie for a in found),
            "near_tie_gaps": [(a.gap, a.bound) for a in found if a.near_tie],
            "diverged": [
                asdict(a) | {"prompt": e.prompt}
                for a, e in zip(found, examples, strict=True)
                if a.step is not None and not a.near_tie
            ],
        }
    return results


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=sorted(TASKS))
    parser.add_argument("--store", type=Path, default=Path("adapters_store"))
    parser.add_argument("--per-task", type=int, help="first N held-out prompts of each task (default: all)")
    parser.add_argument("--max-new-tokens", type=int, help="cap on each task's own output length")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    results = check([TASKS[n] for n in args.tasks], args.store, args.per_task, args.max_new_tokens)
    print(f"{'task':<18}{'score':>8}{'identical':>11}{'near-tie':>10}{'other':>7}")
    for name, r in results.items():
        n = r["total"]
        print(f"{name:<18}{r['score'] / n:>8.0%}{r['identical']:>7}/{n:<3}{r['near_ties']:>10}{len(r['diverged']):>7}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
