"""Mixed-adapter serving vs PEFT on the default model, side by side in one run (issue: mixed-adapter batches).

Every request has 64 prompt tokens and generates 64 tokens (EOS ignored). Cases for our engine:
  B    32 base-model requests at once
  M32  32 requests on 32 distinct r=8 q,v adapters
  M4   4 adapters x 8 requests
  H    4 r=16 adapters on all seven targets x 8 requests
  D    one DoRA adapter, 8 requests, vs the same weights as plain LoRA
Peers in the same process: PEFT mixed batch with `adapter_names` (P), PEFT one request at a time with `set_adapter`
(S), PEFT with the DoRA adapter at batch 8. Load: 128 requests over 32 adapters submitted at once vs S.
Cold load: disk to ready-on-device, median over adapters.

Usage: .venv/bin/python -m bench.bench_adapters
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from bench.common import Request, engine_throughput, random_prompt
from server.engine.factory import build_engine
from server.model.default_model import default_model_dir
from server.settings import Settings
from server.threads import pin_single_thread, use_engine_threads

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPT, OUT = 64, 64


def make_adapters(base_dir: Path, root: Path) -> None:
    """32 r=8 q,v LoRA, 4 r=16 all-target LoRA, one DoRA and the same weights as plain LoRA."""
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    specs = {f"qv{i}": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]) for i in range(32)}
    specs |= {f"all{i}": dict(r=16, lora_alpha=32, target_modules=ALL) for i in range(4)}
    specs["dora"] = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_dora=True)
    for i, (name, kwargs) in enumerate(specs.items()):
        torch.manual_seed(i)
        model = get_peft_model(base, LoraConfig(init_lora_weights=False, **kwargs), adapter_name=name)
        model.save_pretrained(root, selected_adapters=[name])
        base = model.unload()
    plain = root / "dora-as-lora"
    plain.mkdir()
    config = json.loads((root / "dora" / "adapter_config.json").read_text())
    (plain / "adapter_config.json").write_text(json.dumps({**config, "use_dora": False}))
    tensors = load_file(root / "dora" / "adapter_model.safetensors")
    save_file({k: v for k, v in tensors.items() if "magnitude" not in k}, plain / "adapter_model.safetensors")


def requests(adapters: list[str | None], per_adapter: int, vocab: int, seed: int = 0) -> list[Request]:
    rng = random.Random(seed)
    return [Request(random_prompt(rng, PROMPT, vocab), OUT, a) for _ in range(per_adapter) for a in adapters]


def peft_mixed(peft: PeftModel, reqs: list[Request], names: list[str] | None = None) -> float:
    """PEFT generate of all requests as one batch, each row with its adapter (`adapter_names`)."""
    ids = torch.tensor([r.prompt for r in reqs])
    kwargs = {"adapter_names": [r.adapter or "__base__" for r in reqs]} if names is None else {}
    start = time.perf_counter()
    with torch.inference_mode():
        peft.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=OUT, min_new_tokens=OUT,
                      do_sample=False, **kwargs)  # fmt: skip
    return len(reqs) * OUT / (time.perf_counter() - start)


def peft_sequential(peft: PeftModel, reqs: list[Request]) -> float:
    """PEFT one request at a time, switching with set_adapter."""
    start = time.perf_counter()
    for r in reqs:
        peft.set_adapter(r.adapter)
        ids = torch.tensor([r.prompt])
        with torch.inference_mode():
            peft.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=OUT,
                          min_new_tokens=OUT, do_sample=False)  # fmt: skip
    return len(reqs) * OUT / (time.perf_counter() - start)


def cold_load_ms(engine, names: list[str]) -> float:
    """Median disk → host → device-slot time of adapters not yet loaded."""
    times = []
    for name in names:
        start = time.perf_counter()
        key = asyncio.run(engine.adapters.acquire(name))  # the version a request would run with, `name@version`
        asyncio.run(engine.call(lambda core, key=key: core.adapters.bind_slot(key)))
        times.append(1e3 * (time.perf_counter() - start))
        asyncio.run(engine.call(lambda core, key=key: core.adapters.unbind_slot(key)))
        engine.adapters.release(key)
    return statistics.median(times)


def report(name: str, value: float) -> None:
    print(f"{name:36} {value:10.2f}", flush=True)


def main() -> None:
    pin_single_thread()  # only the engine thread computes with every core while it runs (server.threads)
    torch.manual_seed(0)
    base_dir = default_model_dir()
    root = Path(tempfile.mkdtemp(prefix="bench-adapters-"))
    make_adapters(base_dir, root)
    vocab = 49152
    qv = [f"qv{i}" for i in range(32)]
    settings = Settings(adapters_store=root, max_loras=40, max_cpu_loras=64, max_num_seqs=128,
                        kv_cache_bytes=2 * 2**30)  # fmt: skip
    engine = build_engine(settings)
    cases = {
        "B": requests([None], 32, vocab),
        "M32": requests(qv, 1, vocab),
        "M4": requests(qv[:4], 8, vocab),
        "H": requests([f"all{i}" for i in range(4)], 8, vocab),
        "D-dora": requests(["dora"], 8, vocab),
        "D-lora": requests(["dora-as-lora"], 8, vocab),
    }
    ours = {}
    try:
        report("cold load median ms", cold_load_ms(engine, qv[:8]))
        # warm-up: the base model and every adapter, so each is resident (cold loads are timed above), as on a
        # busy server; M32 used to pay for loading 24 of its adapters
        everyone = list({r.adapter for reqs in cases.values() for r in reqs})
        engine_throughput(engine, requests(everyone, 1, vocab, seed=9))
        for name, reqs in cases.items():
            ours[name] = engine_throughput(engine, reqs)
            report(f"{name} engine tok/s", ours[name])
        load = engine_throughput(engine, requests(qv, 4, vocab, seed=3))
        report("Load 128 req / 32 adapters tok/s", load)
    finally:
        engine.shutdown()
    use_engine_threads()  # the engine has stopped: PEFT gets the cores it had
    report("M32 / B (target >= 0.90; #15: >= 0.95)", ours["M32"] / ours["B"])
    report("D DoRA / D LoRA (target >= 0.95)", ours["D-dora"] / ours["D-lora"])
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    peft = PeftModel.from_pretrained(base, root / "qv0", adapter_name="qv0")
    for name in qv[1:]:
        peft.load_adapter(root / name, adapter_name=name)
    s = peft_sequential(peft, cases["M32"][:4])
    report("S  PEFT sequential tok/s", s)
    report("Load / S (target >= 20)", load / s)
    p = peft_mixed(peft, cases["M32"])
    report("P  PEFT mixed batch (M32) tok/s", p)
    report("M32 / P (target >= 3)", ours["M32"] / p)
    dora_base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    pd = peft_mixed(PeftModel.from_pretrained(dora_base, root / "dora"), cases["D-dora"], names=["default"])
    report("PEFT DoRA batch 8 tok/s", pd)
    report("D DoRA / PEFT DoRA (target >= 2)", ours["D-dora"] / pd)


if __name__ == "__main__":
    main()
