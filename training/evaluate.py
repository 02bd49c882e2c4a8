"""Score every task adapter against the base model on the task's held-out prompts.

    python -m training.evaluate --url http://127.0.0.1:8000   # through a running loraplex server
    python -m training.evaluate --offline                      # PEFT + transformers, no server

Over HTTP all requests (every task, adapter and base) are in flight together so the server batches them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import torch
from peft import PeftModel

from training import artifacts
from training.model import generate, load_base
from training.tasks import TASKS, Example, Task

HELDOUT_SEED, HELDOUT_SIZE = 1, 100
TARGET_ADAPTER, TARGET_BASE = 0.9, 0.1


def heldout(task: Task, seed: int = HELDOUT_SEED, n: int = HELDOUT_SIZE) -> list[Example]:
    return task.examples("heldout", n, seed)


def tally(task: Task, examples: Sequence[Example], adapter: Sequence[str], base: Sequence[str]) -> dict[str, Any]:
    """Successes of adapter and base outputs, with a few samples and the adapter's failures for the report."""
    samples = zip(examples[:3], adapter, base, strict=False)
    failures = [(ex, out) for ex, out in zip(examples, adapter, strict=True) if not task.score(out, ex)]
    return {
        "total": len(examples),
        "adapter": len(examples) - len(failures),
        "base": sum(task.score(out, ex) for out, ex in zip(base, examples, strict=True)),
        "samples": [{"prompt": ex.prompt, "adapter": a, "base": b} for ex, a, b in samples],
        "failures": [{"prompt": ex.prompt, "expected": ex.answer, "adapter": out} for ex, out in failures],
    }


def evaluate_offline(tasks: Sequence[Task], store: Path, seed: int = HELDOUT_SEED) -> dict[str, dict[str, Any]]:
    """Scores with PEFT on the saved (float16) adapters, the base model with the adapter disabled."""
    results = {}
    for task in tasks:
        base, tokenizer = load_base()
        model = PeftModel.from_pretrained(base, store / task.name).eval()
        examples = heldout(task, seed)
        prompts = [e.prompt for e in examples]
        adapter_out = generate(model, tokenizer, prompts, task.max_new_tokens)
        with model.disable_adapter():
            base_out = generate(model, tokenizer, prompts, task.max_new_tokens)
        results[task.name] = tally(task, examples, adapter_out, base_out)
    return results


async def chat(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
            "max_tokens": max_tokens}  # fmt: skip
    response = await client.post("/v1/chat/completions", json=body)
    if response.status_code != 200:
        raise RuntimeError(f"{model}: HTTP {response.status_code}: {response.text}")
    return response.json()["choices"][0]["message"]["content"] or ""


async def base_model_name(client: httpx.AsyncClient) -> str:
    """The one model `/v1/models` lists without a `parent`: the base."""
    response = await client.get("/v1/models")
    response.raise_for_status()
    models = response.json()["data"]
    bases = [m["id"] for m in models if not m.get("parent") and m["id"] not in TASKS]
    if len(bases) != 1:
        raise RuntimeError(f"cannot tell the base model among {[m['id'] for m in models]}; pass --base-model")
    missing = sorted(set(TASKS) - {m["id"] for m in models})
    if missing:
        print(f"warning: the server does not list {', '.join(missing)}", file=sys.stderr)
    return bases[0]


async def evaluate_http(
    tasks: Sequence[Task], url: str, base: str | None, concurrency: int, seed: int = HELDOUT_SEED
) -> dict[str, dict[str, Any]]:
    """Scores through the server's chat completions, adapter as `model` = task name, base as the base model."""
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600.0)) as client:
        base = base or await base_model_name(client)

        async def one(model: str, prompt: str, max_tokens: int) -> str:
            async with limit:
                return await chat(client, model, prompt, max_tokens)

        plan = {task.name: heldout(task, seed) for task in tasks}
        jobs = [one(model, e.prompt, task.max_new_tokens) for task in tasks for model in (task.name, base)
                for e in plan[task.name]]  # fmt: skip
        outputs = iter(await asyncio.gather(*jobs))
    results = {}
    for task in tasks:
        n = len(plan[task.name])
        adapter_out, base_out = [next(outputs) for _ in range(n)], [next(outputs) for _ in range(n)]
        results[task.name] = tally(task, plan[task.name], adapter_out, base_out)
    return results


def report(results: dict[str, dict[str, Any]]) -> bool:
    """Print a table; True when every adapter reaches the adapter target and every base stays under the base one."""
    ok = True
    print(f"{'task':<18}{'adapter':>10}{'base':>10}  verdict")
    for name, s in results.items():
        a, b = s["adapter"] / s["total"], s["base"] / s["total"]
        good = a >= TARGET_ADAPTER and b <= TARGET_BASE
        ok &= good
        print(f"{name:<18}{a:>9.0%} {b:>9.0%}  {'ok' if good else 'MISSED'}")
    return ok


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--url", help="base URL of a running loraplex server, e.g. http://127.0.0.1:8000")
    mode.add_argument("--offline", action="store_true", help="score with PEFT + transformers, no server")
    parser.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=sorted(TASKS), help="tasks to score")
    parser.add_argument("--store", type=Path, default=Path("adapters_store"), help="adapter store (offline mode)")
    parser.add_argument("--base-model", help="base model name on the server (default: from /v1/models)")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight at once (HTTP mode)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (offline mode)")
    parser.add_argument("--record", action="store_true", help="write the scores into each adapter's README")
    parser.add_argument("--json", type=Path, help="also write the full results, with samples, to this file")
    args = parser.parse_args(argv)
    tasks = [TASKS[name] for name in args.tasks]
    torch.set_num_threads(args.threads)
    if args.offline:
        results = evaluate_offline(tasks, args.store)
    else:
        results = asyncio.run(evaluate_http(tasks, args.url.rstrip("/"), args.base_model, args.concurrency))
    ok = report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if args.record:
        given = argv if argv is not None else sys.argv[1:]
        command = shlex.join([".venv/bin/python", "-m", "training.evaluate", *given])
        for task in tasks:
            artifacts.record_scores(args.store / task.name, "offline" if args.offline else "http",
                                    results[task.name], command)  # fmt: skip
            artifacts.write_readme(task, args.store / task.name)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
