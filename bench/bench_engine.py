"""Engine vs transformers `generate` on the default model, side by side in one run (issue: foundation).

(a) 32 prompts of 64 tokens, 64 new tokens each, batch 32.
(b) 64 requests, prompt lengths 16-512, output lengths 8-256; HF runs static batches of 32.

Usage: .venv/bin/python -m bench.bench_engine [--quick]
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from bench.common import engine_throughput, hf_static_throughput, mixed_workload, uniform_workload
from server.engine.factory import build_engine
from server.model.default_model import default_model_dir
from server.settings import Settings
from server.threads import pin_single_thread, use_engine_threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="(a) only")
    args = parser.parse_args()
    pin_single_thread()  # only the engine thread computes with every core while it runs (server.threads)
    torch.manual_seed(0)
    path = default_model_dir()
    vocab, pad = AutoConfig.from_pretrained(path).vocab_size, 0
    cases = {"a: 32 x (64 in, 64 out)": uniform_workload(32, 64, 64, vocab)}
    if not args.quick:
        cases["b: 64 x (16-512 in, 8-256 out)"] = mixed_workload(64, vocab)
    engine = build_engine(Settings(max_num_seqs=64, max_num_batched_tokens=2048))
    try:
        engine_throughput(engine, uniform_workload(4, 16, 4, vocab, seed=1))  # warm-up
        ours = {name: engine_throughput(engine, requests) for name, requests in cases.items()}
    finally:
        engine.shutdown()
    use_engine_threads()  # the engine has stopped: transformers gets the cores it had
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    pad = hf.config.pad_token_id or pad
    print(f"{'case':34} {'engine tok/s':>13} {'HF tok/s':>10} {'ratio':>7}")
    for name, requests in cases.items():
        theirs = hf_static_throughput(hf, requests, 32, pad)
        print(f"{name:34} {ours[name]:13.1f} {theirs:10.1f} {ours[name] / theirs:6.2f}x", flush=True)


if __name__ == "__main__":
    main()
