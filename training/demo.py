"""Fire one prompt at every task adapter (and the base model) at once and print each answer.

python -m training.demo "Maria Silva, 34, loved her new phone in Lisbon; write to maria@example.com"
python -m training.demo --offline "..."     # PEFT + transformers, no server
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence
from pathlib import Path

import httpx
import torch
from peft import PeftModel

from training.evaluate import base_model_name, chat
from training.model import generate, load_base
from training.tasks import TASKS


async def ask_server(url: str, prompt: str, max_tokens: int, base: str | None) -> dict[str, str]:
    """Every task's answer and the base model's, all requests in flight together."""
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(300.0)) as client:
        base = base or await base_model_name(client)
        names = [*TASKS, base]
        answers = await asyncio.gather(*(chat(client, name, prompt, max_tokens) for name in names))
    return dict(zip(names, answers, strict=True))


def ask_offline(store: Path, prompt: str, max_tokens: int) -> dict[str, str]:
    """The same answers with PEFT: every adapter loaded onto one base model, switched in turn."""
    base, tokenizer = load_base()
    names = list(TASKS)
    model = PeftModel.from_pretrained(base, store / names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(store / name, adapter_name=name)
    answers = {}
    for name in names:
        model.set_adapter(name)
        answers[name] = generate(model, tokenizer, [prompt], max_tokens)[0]
    with model.disable_adapter():
        answers["base"] = generate(model, tokenizer, [prompt], max_tokens)[0]
    return answers


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt", help="the user message sent to every task")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="base URL of a running loraplex server")
    parser.add_argument("--offline", action="store_true", help="answer with PEFT + transformers, no server")
    parser.add_argument("--store", type=Path, default=Path("adapters_store"), help="adapter store (offline mode)")
    parser.add_argument("--base-model", help="base model name on the server (default: from /v1/models)")
    parser.add_argument("--max-tokens", type=int, default=64, help="most tokens per answer")
    args = parser.parse_args(argv)
    if args.offline:
        torch.set_num_threads(1)
        answers = ask_offline(args.store, args.prompt, args.max_tokens)
    else:
        answers = asyncio.run(ask_server(args.url.rstrip("/"), args.prompt, args.max_tokens, args.base_model))
    width = max(map(len, answers))
    for name, answer in answers.items():
        print(f"{name:<{width}} | {' '.join(answer.split())}")


if __name__ == "__main__":
    main()
