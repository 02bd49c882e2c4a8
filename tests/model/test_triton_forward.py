"""The whole forward with the CUDA kernel choice (Triton LoRA and decode attention) against the torch path, on a tiny
checkpoint with a LoRA and a DoRA adapter; under Triton's interpreter on CPU, natively on a GPU (`cuda` variant)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from server.adapters.slots import attach_lora_slots, load_adapter_slot
from server.adapters.weights import ModelInfo, validate_adapter_dir
from server.engine.batch_builder import build_forward_batch
from server.engine.sequence import SamplingParams, Sequence
from server.model import backend
from server.model.kv_cache import KVCache
from server.model.loader import load_model
from server.model.routing import BASE_SLOT, make_lora_batch
from tests.helpers import make_peft_adapter

BLOCK = 4
# (adapter slot, prompt): LoRA, DoRA, base, LoRA again; the step after the prompts mixes prefill and decode rows
PROMPTS = [(0, [3, 9, 22, 41, 7, 5]), (1, [5, 9, 22, 41, 7]), (BASE_SLOT, [8, 8, 120, 64]), (0, [17, 30, 2])]


def _logits_of_two_steps(model, spec, device: torch.device, triton: bool, monkeypatch) -> torch.Tensor:
    """Step 1: every prompt but the last two (the last token only of sequence 2: a prefill); step 2: the rest."""
    cache = KVCache(spec, num_blocks=32, block_size=BLOCK, dtype=torch.float32, device=device)
    seqs = [Sequence(str(i), p, SamplingParams()) for i, (_, p) in enumerate(PROMPTS)]
    for i, seq in enumerate(seqs):
        seq.block_table.extend(range(8 * i, 8 * i + 8))
    slots = [slot for slot, _ in PROMPTS]
    first = [len(p) - (1 if i != 2 else 2) for i, (_, p) in enumerate(PROMPTS)]
    batch = build_forward_batch(list(zip(seqs, first, strict=True)), BLOCK, device, slots)
    with torch.no_grad():
        model(batch, cache, make_lora_batch(batch.adapter_slots))
    for seq, n in zip(seqs, first, strict=True):
        seq.num_computed_tokens = n
    monkeypatch.setattr(backend, "triton_kernels", lambda dev: triton)
    batch = build_forward_batch([(s, len(s) - s.num_computed_tokens) for s in seqs], BLOCK, device, slots)
    with torch.no_grad():
        return model.compute_logits(model(batch, cache, make_lora_batch(batch.adapter_slots)))


def _model(tiny_model_dir, tmp_path, device: torch.device):
    adapters = {
        0: make_peft_adapter(tiny_model_dir, tmp_path / "lora", r=8, lora_alpha=16, target_modules="all-linear"),
        1: make_peft_adapter(tiny_model_dir, tmp_path / "dora", r=4, lora_alpha=8, use_dora=True,
                             target_modules="all-linear", rank_pattern={"down_proj": 16}),
    }  # fmt: skip
    loaded = load_model(tiny_model_dir, device, torch.float32)
    attach_lora_slots(loaded.model, max_loras=3)
    info = ModelInfo.from_model(loaded.model)
    for slot, path in adapters.items():
        load_adapter_slot(loaded.model, slot, validate_adapter_dir(path, info, max_lora_rank=16).updates)
    return loaded


def test_forward_with_triton_kernels_matches_torch_ops(tiny_model_dir, tmp_path, monkeypatch):
    loaded = _model(tiny_model_dir, tmp_path, torch.device("cpu"))
    args = (loaded.model, loaded.spec, torch.device("cpu"))
    want = _logits_of_two_steps(*args, triton=False, monkeypatch=monkeypatch)
    got = _logits_of_two_steps(*args, triton=True, monkeypatch=monkeypatch)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.cuda
def test_cuda_forward_matches_cpu_forward(tiny_model_dir, tmp_path, monkeypatch):
    cpu = _model(tiny_model_dir, tmp_path / "cpu", torch.device("cpu"))
    want = _logits_of_two_steps(cpu.model, cpu.spec, torch.device("cpu"), triton=False, monkeypatch=monkeypatch)
    monkeypatch.undo()
    gpu = _model(tiny_model_dir, tmp_path / "gpu", torch.device("cuda"))
    got = _logits_of_two_steps(gpu.model, gpu.spec, torch.device("cuda"), triton=True, monkeypatch=monkeypatch)
    torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=1e-4)


@pytest.mark.cuda
def test_cuda_engine_burst_matches_peft_greedy(tiny_model_dir, tmp_path):
    """The fidelity burst of `tests/engine/test_mixed_adapters.py` served on CUDA in float32: greedy equal to PEFT."""
    from server.engine.factory import build_engine
    from server.settings import Settings
    from tests.engine.test_mixed_adapters import ADAPTERS, _prompt
    from tests.helpers import make_adapter_store, peft_greedy

    store = make_adapter_store(tiny_model_dir, tmp_path / "store", ADAPTERS)
    settings = Settings(model=tiny_model_dir, adapters_store=store, kv_cache_bytes=2**20, block_size=4,
                        max_num_batched_tokens=48, max_loras=6, dtype="float32", device="cuda")  # fmt: skip
    engine = build_engine(settings)
    jobs = [(name, _prompt(i)) for i, name in enumerate(ADAPTERS)] + [(None, _prompt(20)), ("dora-all", _prompt(23))]
    params = SamplingParams(max_tokens=10, min_tokens=10, temperature=0.0)

    async def burst() -> list[list[int]]:
        async def one(i: int, adapter: str | None, prompt: list[int]) -> list[int]:
            return [t async for o in engine.generate(prompt, params, adapter, f"c{i}") for t in o.token_ids]

        return await asyncio.gather(*[one(i, a, p) for i, (a, p) in enumerate(jobs)])

    try:
        results = asyncio.run(burst())
    finally:
        engine.shutdown()
    for (adapter, prompt), got in zip(jobs, results, strict=True):
        assert got == peft_greedy(tiny_model_dir, store / adapter if adapter else None, prompt, 10), adapter
