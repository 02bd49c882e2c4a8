"""Ray Serve path vs one process, at equal total cores, on a many-adapter workload.

- Throughput: 2 replicas x 1 CPU (`loraplex serve-ray`) vs 1 process x 2 threads (`loraplex serve`), the same
  streamed load over `--adapters` r=8 q,v adapters sent all at once. On 2 cores this measures the cost of the Ray
  path (ingress hop, object store, routing); the issue's bound is <= 15 % lower output throughput.
- TTFT at low load: one request at a time through each, median time to first token.

Both servers are driven over HTTP by `load_tests`, so the client side is the same. Run on a quiet machine:

    OMP_NUM_THREADS=1 python -m bench.bench_ray                    # default model, 32 adapters
    OMP_NUM_THREADS=1 python -m bench.bench_ray --tiny --adapters 4 --requests 8   # smoke run, tiny random model
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from load_tests.cli import run_load
from load_tests.readiness import wait_until_ok
from load_tests.workload import LengthRange, Workload
from tests.helpers import make_tiny_checkpoint, ray_ingress_port

TOTAL_CPUS = 2


def make_store(model_dir: Path, root: Path, count: int) -> None:
    """`count` random r=8 q,v LoRA adapters for the model (PEFT writes them; the servers never import it)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for i in range(count):
        torch.manual_seed(i)
        config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        model = get_peft_model(base, config, adapter_name=f"qv{i}")
        model.save_pretrained(root, selected_adapters=[f"qv{i}"])
        base = model.unload()


def wait_for_replicas(url: str, count: int, timeout_s: float = 600) -> None:
    """Until `/metrics` shows `count` replicas: /health answers as soon as one is up, and a burst sent then would
    pile every adapter onto it."""
    deadline = time.monotonic() + timeout_s
    while len(set(re.findall(r'replica="([^"]+)"', httpx.get(f"{url}/metrics", timeout=30).text))) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"fewer than {count} replicas came up within {timeout_s:g} s")
        time.sleep(0.5)


def requests_per_replica(url: str) -> list[int]:
    """Requests each replica served so far (from the merged `/metrics`), largest first."""
    served: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for sample in family.samples:
            if sample.name == "loraplex_requests_total":
                served[sample.labels["replica"]] = served.get(sample.labels["replica"], 0) + sample.value
    return sorted((int(n) for n in served.values()), reverse=True)


@contextmanager
def server(command: str, flags: list[str], threads: int) -> Iterator[str]:
    """`python -m server <command> <flags>` on a free port, its engine(s) computing with `threads` threads each."""
    port = ray_ingress_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)  # serve-ray starts its own local head
    proc = subprocess.Popen([sys.executable, "-m", "server", command, "--port", str(port), *flags], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ok(f"{url}/health", 600, alive=lambda: proc.poll() is None, poll_s=0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=120)


def measure(url: str, adapters: list[str], args: argparse.Namespace) -> tuple[float, float]:
    """(output tokens/s under the burst, median TTFT ms one request at a time)."""
    vocab_ids = LengthRange(100, 250) if args.tiny else LengthRange(100, 49000)
    lengths = {"prompt_len": LengthRange(args.prompt_len, args.prompt_len),
               "output_len": LengthRange(args.output_len, args.output_len), "token_ids": vocab_ids}  # fmt: skip
    asyncio.run(run_load(url, Workload(num_requests=len(adapters), **lengths, seed=9), adapters))  # warm-up
    burst = asyncio.run(run_load(url, Workload(num_requests=args.requests, **lengths), adapters))
    quiet = asyncio.run(run_load(url, Workload(num_requests=args.ttft_requests, **lengths, seed=1), adapters,
                                 max_concurrency=1))  # fmt: skip
    for report in (burst, quiet):
        if report["failed"]:
            raise RuntimeError(f"{report['failed']} requests failed: {report['errors']}")
    return burst["output_throughput"], quiet["median_ttft_ms"]


def report(name: str, value: float) -> None:
    print(f"{name:40} {value:10.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny random model instead of the default one (smoke)")
    parser.add_argument("--adapters", type=int, default=32, help="distinct adapters the load spreads over")
    parser.add_argument("--requests", type=int, default=128, help="requests of the throughput burst")
    parser.add_argument("--ttft-requests", type=int, default=16, help="requests of the low-load TTFT run")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    if args.tiny:
        model_dir = make_tiny_checkpoint(root / "model", max_position_embeddings=4096)
    else:
        from server.model.default_model import default_model_dir

        model_dir = default_model_dir()
    make_store(model_dir, root / "store", args.adapters)
    adapters = [f"qv{i}" for i in range(args.adapters)]
    flags = ["--model", str(model_dir), "--adapters-store", str(root / "store"), "--max-loras", str(args.adapters),
             "--max-num-seqs", "128", "--kv-cache-bytes", str(2**30)]  # fmt: skip
    with server("serve", flags, threads=TOTAL_CPUS) as url:
        direct = measure(url, adapters, args)
    ray_flags = [*flags, "--replicas", str(TOTAL_CPUS), "--num-cpus-per-replica", "1"]
    with server("serve-ray", ray_flags, threads=1) as url:
        wait_for_replicas(url, TOTAL_CPUS)
        through_ray = measure(url, adapters, args)
        split = requests_per_replica(url)
    report("1 process x 2 threads: output tok/s", direct[0])
    report("2 replicas x 1 CPU (Ray): output tok/s", through_ray[0])
    report("Ray overhead % (target <= 15)", 100 * (1 - through_ray[0] / direct[0]))
    print(f"{'requests per replica (all phases)':40} {split}", flush=True)
    report("TTFT direct, low load: median ms", direct[1])
    report("TTFT through Ray, low load: median ms", through_ray[1])


if __name__ == "__main__":
    main()
