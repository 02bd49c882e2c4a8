"""Merging an adapter into the base weights: every token's output unchanged, exact restore, refusals."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from server.adapters.slots import attach_lora_slots, load_adapter_slot
from server.adapters.weights import ModelInfo, validate_adapter_dir
from server.engine.batch_builder import build_forward_batch
from server.engine.sequence import SamplingParams, Sequence
from server.model.kv_cache import KVCache
from server.model.loader import LoadedModel, load_model
from server.model.lora_weights import LoraWeights
from server.model.merge import WeightMerger
from server.model.routing import BASE_SLOT, MERGED_SLOT, make_lora_batch
from tests.helpers import make_adapter_store

ADAPTERS = {
    "x-lora": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "x-dora": dict(r=4, lora_alpha=8, use_dora=True, target_modules="all-linear"),
    "y": dict(r=16, lora_alpha=8, target_modules="all-linear"),
    "z-dora": dict(r=8, lora_alpha=16, use_dora=True, target_modules=["q_proj", "v_proj", "o_proj"]),
}
SLOTS = {"x-lora": 0, "x-dora": 1, "y": 2, "z-dora": 3}
# (adapter, prompt): long runs are served by GEMMs, short ones gathered per token, next to base tokens
PROMPTS = [
    ("x", list(range(3, 23))),
    ("y", [5, 9, 22]),
    (None, [8, 8, 120, 64]),
    ("z-dora", list(range(40, 58))),
    ("x", [17]),
    ("y", list(range(60, 80))),
    (None, [33]),
]


@pytest.fixture(scope="module")
def store(tiny_model_dir, tmp_path_factory):
    return make_adapter_store(tiny_model_dir, tmp_path_factory.mktemp("merge-store"), ADAPTERS)


@pytest.fixture
def served(tiny_model_dir, store) -> tuple[LoadedModel, ModelInfo, dict[str, dict]]:
    loaded = load_model(tiny_model_dir, torch.device("cpu"), torch.float32)
    attach_lora_slots(loaded.model, max_loras=4)
    info = ModelInfo.from_model(loaded.model)
    updates = {name: validate_adapter_dir(store / name, info, max_lora_rank=16).updates for name in ADAPTERS}
    for name, slot in SLOTS.items():
        load_adapter_slot(loaded.model, slot, updates[name])
    return loaded, info, updates


def _logits(loaded: LoadedModel, x_name: str, merged: bool) -> list[torch.Tensor]:
    """Logits of every prompt in one packed prefill step; X's tokens are MERGED_SLOT when `merged`."""
    slot = {"x": MERGED_SLOT if merged else SLOTS[x_name], None: BASE_SLOT, **SLOTS}
    order = sorted(range(len(PROMPTS)), key=lambda i: slot[PROMPTS[i][0]])
    seqs = [Sequence(str(i), PROMPTS[i][1], SamplingParams()) for i in order]
    for i, seq in enumerate(seqs):
        seq.block_table.extend(range(8 * i, 8 * i + 8))
    slots = [slot[PROMPTS[i][0]] for i in order]
    batch = build_forward_batch([(s, len(s)) for s in seqs], 4, torch.device("cpu"), slots)
    cache = KVCache(loaded.spec, num_blocks=64, block_size=4, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        logits = loaded.model.compute_logits(loaded.model(batch, cache, make_lora_batch(batch.adapter_slots)))
    rows = [logits[batch.query_start[j] : batch.query_start[j + 1]] for j in range(len(seqs))]
    return [rows[order.index(i)] for i in range(len(PROMPTS))]


@pytest.mark.parametrize("x_name", ["x-lora", "x-dora"])
def test_merged_outputs_equal_unmerged_for_every_token(served, x_name):
    loaded, _, updates = served
    want = _logits(loaded, x_name, merged=False)
    merger = WeightMerger(loaded.model.projections)
    merger.merge(updates[x_name])
    got = _logits(loaded, x_name, merged=True)
    for (adapter, _), g, w in zip(PROMPTS, got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4, msg=f"{adapter} with {x_name} merged")
    merger.unmerge()
    for g, w in zip(_logits(loaded, x_name, merged=False), want, strict=True):
        assert g.equal(w)


def _weights(loaded: LoadedModel) -> dict:
    return {key: (lin.weight, lin.weight.detach().clone(), lin.packed) for key, lin in _linears(loaded).items()}


def _linears(loaded: LoadedModel) -> dict:
    return loaded.model.projections.fused


def _merged_weight(linear, pristine: torch.Tensor, updates) -> torch.Tensor:
    """What merging `updates` must serve on `linear`, computed from scratch: g ⊙ (W + s·B·A) on each slice."""
    want = pristine.clone()
    for proj, (start, end) in linear.slices.items():
        w = updates.get(proj)
        if w is not None:
            want[start:end] = ((pristine[start:end] + w.b @ w.a) * (1 if w.g is None else w.g[:, None])).float()
    return want


def test_hundred_cycles_leave_the_base_weights_bit_identical(served):
    loaded, _, updates = served
    before = _weights(loaded)
    want = _logits(loaded, "x-lora", merged=False)
    merger = WeightMerger(loaded.model.projections)
    order = ["x-lora", "x-dora", "y", "y", "x-lora", "z-dora", "z-dora"]  # buffers reused, kept or shed
    for cycle in range(100):
        name = order[cycle % len(order)]
        per_layer = {}
        for (layer, proj), w in updates[name].items():
            per_layer.setdefault(layer, {})[proj] = w
        merger.merge(updates[name])
        for (layer, fused), lin in _linears(loaded).items():
            if lin.merged is not None:
                expected = _merged_weight(lin, before[(layer, fused)][1], per_layer.get(layer, {}))
                torch.testing.assert_close(lin.merged, expected, atol=1e-6, rtol=1e-6, msg=f"{name}, cycle {cycle}")
        assert any(lin.merged is not None for lin in _linears(loaded).values())
        merger.unmerge()
    for key, lin in _linears(loaded).items():
        original, copy, packed = before[key]
        assert lin.weight is original and lin.weight.equal(copy) and lin.packed is packed
        assert lin.merged is None and lin.lora.correction is None
    assert all(g.equal(w) for g, w in zip(_logits(loaded, "x-lora", merged=False), want, strict=True))


def test_merge_buffers_cover_only_the_layers_of_the_latest_merge(served):
    loaded, _, updates = served
    merger = WeightMerger(loaded.model.projections)
    merger.merge(updates["x-lora"])  # q_proj and v_proj: the fused qkv layers only
    qkv = [lin for (_, name), lin in _linears(loaded).items() if name == "qkv_proj"]
    assert {lin for lin in _linears(loaded).values() if lin.merged is not None} == set(qkv)
    assert merger.num_bytes == sum(lin.weight.numel() * 4 for lin in qkv)
    merger.unmerge()
    assert merger.num_bytes == sum(lin.weight.numel() * 4 for lin in qkv)  # kept for the next merge
    merger.merge(updates["y"])  # every layer
    merger.unmerge()
    merger.merge(updates["x-lora"])
    assert merger.num_bytes == sum(lin.weight.numel() * 4 for lin in qkv)
    merger.unmerge()


def test_merged_layers_get_packed_copies_one_per_call_and_keep_them_while_their_rows_do_not_change(served):
    loaded, _, updates = served
    want = _logits(loaded, "x-dora", merged=False)
    merger = WeightMerger(loaded.model.projections)
    merger.merge(updates["x-dora"])  # every layer
    merged = [lin for lin in _linears(loaded).values() if lin.merged is not None]
    if merged[0].packed is None:
        pytest.skip("oneDNN is not available: nothing is packed")
    plain_bytes = merger.num_bytes
    assert all(lin.merged_packed is None for lin in merged) and merger.needs_packing
    for count in range(1, len(merged) + 1):
        merger.pack_next()
        assert sum(lin.merged_packed is not None for lin in merged) == count
    assert not merger.needs_packing and merger.num_bytes == 2 * plain_bytes
    got = _logits(loaded, "x-dora", merged=True)  # runs of 4+ tokens take the packed merged GEMMs
    assert all(torch.allclose(g, w, atol=1e-4, rtol=1e-4) for g, w in zip(got, want, strict=True))
    merger.unmerge()
    assert all(lin.merged_packed is None for lin in merged)
    merger.merge(updates["x-dora"])  # the same rows again: the packed copies come back at once
    assert not merger.needs_packing
    merger.unmerge()
    merger.merge(updates["y"])  # other rows: packing starts over
    assert merger.needs_packing and all(lin.merged_packed is None for lin in _linears(loaded).values())
    merger.unmerge()


def test_dora_factors_of_adapters_loaded_while_merged_come_from_pristine_weights(served, store):
    loaded, info, updates = served
    merger = WeightMerger(loaded.model.projections)
    merger.merge(updates["x-dora"])
    during = validate_adapter_dir(store / "z-dora", info, max_lora_rank=16).updates
    merger.unmerge()
    for key, update in updates["z-dora"].items():
        assert during[key].g.equal(update.g)


def test_refused_merges_change_nothing(served):
    loaded, _, updates = served
    before = _weights(loaded)
    want = _logits(loaded, "x-lora", merged=False)
    merger = WeightMerger(loaded.model.projections)
    (layer, proj), update = next(iter(updates["x-dora"].items()))
    zero_g = {**updates["x-dora"], (layer, proj): dataclasses.replace(update, g=torch.zeros_like(update.g))}
    with pytest.raises(ValueError, match="DoRA factor is 0"):
        merger.merge(zero_g)
    infinite = dataclasses.replace(update, b=torch.full_like(update.b, float("inf")))
    with pytest.raises(ValueError, match="non-finite"):
        merger.merge({**updates["x-lora"], (layer, proj): infinite})  # fails after other layers were filled
    huge = dataclasses.replace(update, a=torch.full_like(update.a, 1e30), b=torch.full_like(update.b, 1e30))
    for _ in range(2):  # the rows a refused merge left are not taken for a good merge of the same update
        with pytest.raises(ValueError, match="non-finite"):
            merger.merge({(layer, proj): huge})  # finite factors, overflowing product
    with pytest.raises(ValueError, match="no projections"):
        merger.merge({(9, "q_proj"): update})
    wrong_shape = LoraWeights(a=torch.zeros(2, 3), b=torch.zeros(update.b.shape[0], 2))
    with pytest.raises(ValueError, match="do not fit"):
        merger.merge({(layer, proj): wrong_shape})
    for key, lin in _linears(loaded).items():
        assert lin.weight is before[key][0] and lin.packed is before[key][2]
        assert lin.merged is None and lin.lora.correction is None
    assert not merger.is_merged
    merger.merge(updates["x-lora"])  # buffers a failed merge left behind serve a good one correctly
    merged = _logits(loaded, "x-lora", merged=True)
    assert all(torch.allclose(g, w, atol=1e-4, rtol=1e-4) for g, w in zip(merged, want, strict=True))
    with pytest.raises(ValueError, match="unmerge it first"):
        merger.merge(updates["y"])
    merger.unmerge()


def test_low_precision_weights_are_merged_in_float32_and_restored_exactly(tiny_model_dir, store):
    loaded = load_model(tiny_model_dir, torch.device("cpu"), torch.bfloat16)
    attach_lora_slots(loaded.model, max_loras=2)
    info = ModelInfo.from_model(loaded.model)
    updates = validate_adapter_dir(store / "z-dora", info, max_lora_rank=16).updates
    before = _weights(loaded)
    merger = WeightMerger(loaded.model.projections)
    merger.merge(updates)
    for (layer, proj), w in updates.items():
        fused = "qkv_proj" if proj in ("q_proj", "v_proj") else proj
        linear = loaded.model.projections.fused[(layer, fused)]
        start, end = linear.slices[proj]
        pristine = before[(layer, fused)][1][start:end].float()
        want = ((pristine + w.b.float() @ w.a.float()) * w.g.float()[:, None]).to(torch.bfloat16)
        assert linear.merged.dtype == torch.bfloat16
        torch.testing.assert_close(linear.merged[start:end], want, atol=0, rtol=2**-7)  # one bf16 rounding
    merger.unmerge()
    for key, lin in _linears(loaded).items():
        assert lin.weight is before[key][0] and lin.weight.equal(before[key][1]) and lin.merged is None
