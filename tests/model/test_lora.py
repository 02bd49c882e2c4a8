"""The SGMV/BGMV fast paths against the reference op, slot storage, and loading adapters into a model's slots."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from server.adapters.packing import packed
from server.adapters.slots import attach_lora_slots, clear_adapter_slot, load_adapter_slot
from server.adapters.weights import ModelInfo, validate_adapter_dir
from server.engine.batch_builder import build_forward_batch
from server.engine.sequence import SamplingParams, Sequence
from server.model.gemm_shapes import padded_rows
from server.model.kv_cache import KVCache
from server.model.linear import TargetLinear
from server.model.loader import load_model
from server.model.lora import lora_reference
from server.model.lora_weights import LoraWeights
from server.model.projections import ProjectionMap
from server.model.routing import BASE_SLOT, MERGED_SLOT, buffer_row, make_lora_batch
from tests.helpers import make_peft_adapter, peft_logits

IN = 32
SLICES = {"q_proj": (0, 32), "k_proj": (32, 48), "v_proj": (48, 64)}
OUT = 64


def _random_update(rank: int, out: int, dora: bool) -> LoraWeights:
    g = 1 + 0.3 * torch.randn(out) if dora else None
    return LoraWeights(a=torch.randn(rank, IN) / IN**0.5, b=torch.randn(out, rank) / rank**0.5, g=g)


# slot -> (rank, DoRA, projections it targets)
ADAPTERS = {
    0: (1, False, ("q_proj", "v_proj")),
    1: (8, True, ("q_proj", "k_proj", "v_proj")),
    2: (16, False, ("k_proj",)),
    3: (64, True, ("v_proj",)),
    5: (8, False, ("q_proj", "k_proj", "v_proj")),
}
MAX_LORAS = 6


def _layer_with_adapters() -> tuple[TargetLinear, dict[int, dict[str, LoraWeights]]]:
    linear = TargetLinear(torch.randn(OUT, IN) / IN**0.5, SLICES)
    linear.enable_adapters(MAX_LORAS)
    loaded = {}
    for slot, (rank, dora, names) in ADAPTERS.items():
        loaded[slot] = {n: _random_update(rank, SLICES[n][1] - SLICES[n][0], dora) for n in names}
        linear.lora.load_slot(slot, loaded[slot])
    return linear, loaded


def _expected(linear: TargetLinear, loaded, x: torch.Tensor, token_slots: torch.Tensor) -> torch.Tensor:
    """Base GEMM, then `lora_reference` (DoRA's g included) on each projection."""
    y = x @ linear.weight.T
    for name, (start, end) in SLICES.items():
        updates = {slot: pieces[name] for slot, pieces in loaded.items() if name in pieces}
        lora_reference(x, y[:, start:end], updates, token_slots)
    return y


TOKENS = [1, 1, -1, 0, 0, 0, 0, 0, 3, 2, 2, 5, -1, -1, 3, 3, 3, 3, 3, 3, 4, 1, 0, 2]  # slot 4 is empty


@pytest.mark.parametrize("min_gemm_run", [1, 4, 10**9], ids=["sgmv", "mixed", "bgmv"])
def test_fast_paths_match_reference(min_gemm_run):
    linear, loaded = _layer_with_adapters()
    token_slots = torch.tensor(TOKENS)
    x = torch.randn(len(TOKENS), IN)
    batch = make_lora_batch(token_slots, min_gemm_run=min_gemm_run)
    assert (not batch.gemm_runs) == (min_gemm_run > len(TOKENS))
    with torch.no_grad():
        got = linear(x, batch)
    torch.testing.assert_close(got, _expected(linear, loaded, x, token_slots), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tokens", [[5, 5, 1, 3, 0, 2], [5, 1, 0, 2], [3, -1, -1, -1, 1], [2, 2, 2, 2, 2]])
def test_decode_shapes_match_reference(tokens):
    linear, loaded = _layer_with_adapters()
    token_slots = torch.tensor(tokens)
    x = torch.randn(len(tokens), IN)
    with torch.no_grad():
        got = linear(x, make_lora_batch(token_slots))
    torch.testing.assert_close(got, _expected(linear, loaded, x, token_slots), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("min_gemm_run", [1, 10**9], ids=["sgmv", "bgmv"])
def test_merged_layer_matches_reference_and_restores_the_other_tokens(min_gemm_run):
    linear, loaded = _layer_with_adapters()
    merged = {"q_proj": _random_update(8, 32, dora=True), "v_proj": _random_update(4, 16, dora=False)}
    weight = linear.weight.detach().clone()
    for name, update in merged.items():
        start, end = SLICES[name]
        update.merge_into(linear.weight.detach()[start:end], weight[start:end])
    token_slots = torch.tensor([MERGED_SLOT, MERGED_SLOT, 1, 1, -1, 0, MERGED_SLOT, 3, 3, 3, 5])
    x = torch.randn(len(token_slots), IN)
    unmerged = _expected(linear, loaded, x, token_slots)  # the merged adapter's tokens get the base output here
    linear.serve_merged(weight)
    linear.lora.set_correction(merged)
    with torch.no_grad():
        got = linear(x, make_lora_batch(token_slots, min_gemm_run=min_gemm_run))
    want = x @ weight.T
    for name, (start, end) in SLICES.items():
        updates = {slot: pieces[name] for slot, pieces in loaded.items() if name in pieces}
        lora_reference(x, want[:, start:end], updates, token_slots, merged.get(name))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    others = token_slots != MERGED_SLOT
    torch.testing.assert_close(got[others], unmerged[others], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[~others], x[~others] @ weight.T, atol=1e-5, rtol=1e-5)


def test_base_only_batch_does_no_work():
    linear, _ = _layer_with_adapters()
    x = torch.randn(5, IN)
    y = x @ linear.weight.T
    assert linear.lora.apply(x, y.clone(), make_lora_batch(torch.full((5,), BASE_SLOT))).equal(y)
    only_empty_slot = make_lora_batch(torch.tensor([4, 4]))
    assert linear.lora.apply(x[:2], y[:2].clone(), only_empty_slot).equal(y[:2])


def test_reload_with_smaller_rank_and_clear_leave_no_stale_weights():
    linear, loaded = _layer_with_adapters()
    smaller = {"k_proj": _random_update(2, 16, dora=False)}
    linear.lora.load_slot(3, smaller)  # slot 3 held a rank-64 DoRA update of v_proj
    loaded[3] = smaller
    linear.lora.clear_slot(1)
    del loaded[1]
    token_slots = torch.tensor([3, 3, 1, 1, 0])
    x = torch.randn(5, IN)
    for min_run in (1, 10**9):
        got = linear(x, make_lora_batch(token_slots, min_gemm_run=min_run))
        torch.testing.assert_close(got, _expected(linear, loaded, x, token_slots), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["as loaded", "packed"])
def test_a_reused_slot_holds_exactly_what_a_fresh_slot_would(layout):
    """A load clears only what the slot's previous adapter wrote: after any run of ranks (partial granules, DoRA or
    not, projections dropped), the slot's rows equal those of a slot that only ever held the last adapter."""
    prepare = partial(packed, dtype=torch.float32) if layout == "packed" else dict
    history = [
        {"q_proj": _random_update(64, 32, dora=True), "v_proj": _random_update(40, 16, dora=True)},
        {"q_proj": _random_update(8, 32, dora=False)},
        {"q_proj": _random_update(40, 32, dora=False), "k_proj": _random_update(3, 16, dora=True)},
        {"q_proj": _random_update(36, 32, dora=False)},  # a partial granule where the last held a whole one
        {},
        {"k_proj": _random_update(19, 16, dora=False), "v_proj": _random_update(16, 16, dora=False)},
    ]
    weight = torch.randn(OUT, IN)
    reused, fresh = TargetLinear(weight, SLICES), TargetLinear(weight, SLICES)
    reused.enable_adapters(2)
    fresh.enable_adapters(2)
    fresh.lora.load_slot(1, history[0])  # the same buffer capacities as the reused layer's
    for n, updates in enumerate(history[1:], start=1):
        reused.lora.load_slot(0, prepare(history[n - 1]))
        reused.lora.load_slot(0, prepare(updates))
        fresh.lora.clear_slot(0)
        fresh.lora.load_slot(0, updates)
        row = buffer_row(0)
        for name in SLICES:
            got, want = reused.lora._slices[name], fresh.lora._slices[name]
            assert got.rank.get(0) == want.rank.get(0) and (0 in got.dora) == (0 in want.dora), (n, name)
            assert got.cap == want.cap, (n, name)
            for buffer in ("a_t", "b_t", "g", "row_ranks") if got.cap else ():
                assert getattr(got, buffer)[row].equal(getattr(want, buffer)[row]), (n, name, buffer)


def test_rank_buffers_grow_only_when_needed_and_keep_earlier_slots():
    linear = TargetLinear(torch.randn(OUT, IN), SLICES)
    linear.enable_adapters(3)
    slots = linear.lora
    first = {"q_proj": _random_update(4, 32, dora=False)}
    slots.load_slot(0, first)
    buffer = slots._slices["q_proj"].a_t
    slots.load_slot(1, {"q_proj": _random_update(8, 32, dora=False)})
    assert slots._slices["q_proj"].a_t is buffer  # rank 8 fits the capacity of 8 allocated for rank 4
    assert slots._slices["k_proj"].cap == 0  # never targeted: nothing allocated
    slots.load_slot(2, {"q_proj": _random_update(12, 32, dora=False)})
    assert slots._slices["q_proj"].a_t.shape == (4, 1, IN, 16)  # [N + 1, granules, in, ranks per granule]
    slots.load_slot(1, {"q_proj": _random_update(40, 32, dora=False)})
    assert slots._slices["q_proj"].a_t.shape == (4, 3, IN, 16)
    x = torch.randn(2, IN)
    want = x @ linear.weight.T
    want[:, :32] += (x @ first["q_proj"].a.T) @ first["q_proj"].b.T
    for min_run in (1, 10**9):
        got = linear(x, make_lora_batch(torch.tensor([0, 0]), min_gemm_run=min_run))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_load_slot_refuses_bad_input_and_keeps_the_slot():
    linear, _ = _layer_with_adapters()
    x = torch.randn(3, IN)
    batch = make_lora_batch(torch.tensor([1, 1, 1]))
    before = linear(x, batch)
    with pytest.raises(ValueError, match="slot"):
        linear.lora.load_slot(MAX_LORAS, {})
    with pytest.raises(ValueError, match="o_proj"):
        linear.lora.load_slot(1, {"o_proj": _random_update(2, 32, dora=False)})
    with pytest.raises(ValueError, match="do not fit"):
        linear.lora.load_slot(1, {"q_proj": _random_update(2, 32, dora=False), "k_proj": _random_update(2, 8, False)})
    assert linear(x, batch).equal(before)


class _TwoLayers:
    """Just what the slot helpers use of a model: its projection map."""

    def __init__(self) -> None:
        self.layers = [{"qkv_proj": TargetLinear(torch.randn(OUT, IN), SLICES)} for _ in range(2)]
        self.projections = ProjectionMap({(i, "qkv_proj"): layer["qkv_proj"] for i, layer in enumerate(self.layers)})

    def enable_adapters(self, max_loras: int) -> None:
        for linear in self.projections.linears:
            linear.enable_adapters(max_loras)


def test_model_helpers_load_and_clear_every_layer():
    model = _TwoLayers()
    attach_lora_slots(model, max_loras=2)
    targets = model.projections
    assert sorted(targets) == sorted((i, n) for i in range(2) for n in SLICES)
    update = _random_update(4, 16, dora=False)
    load_adapter_slot(model, 1, {(1, "v_proj"): update})
    batch = make_lora_batch(torch.tensor([1, 1]))
    x = torch.randn(2, IN)
    first, second = (model.layers[i]["qkv_proj"] for i in range(2))
    assert first(x, batch).equal(x @ first.weight.T)
    torch.testing.assert_close(second(x, batch)[:, 48:], x @ second.weight[48:].T + (x @ update.a.T) @ update.b.T)
    clear_adapter_slot(model, 1)
    assert second(x, batch).equal(x @ second.weight.T)
    with pytest.raises(ValueError, match="no projections"):
        load_adapter_slot(model, 0, {(2, "q_proj"): update})
    load_adapter_slot(model, 1, {(0, "v_proj"): update})
    with pytest.raises(ValueError, match="do not fit"):
        load_adapter_slot(model, 1, {(0, "k_proj"): update, (1, "q_proj"): update})
    torch.testing.assert_close(first(x, batch)[:, 48:], x @ first.weight[48:].T + (x @ update.a.T) @ update.b.T)


def test_packed_forward_with_mixed_adapters_matches_peft(tiny_model_dir, tmp_path):
    adapters = {
        0: make_peft_adapter(tiny_model_dir, tmp_path / "lora", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]
                             ),
        1: make_peft_adapter(tiny_model_dir, tmp_path / "dora", r=4, lora_alpha=8, use_dora=True,
                         target_modules="all-linear", rank_pattern={"down_proj": 16}),
    }  # fmt: skip
    loaded = load_model(tiny_model_dir, torch.device("cpu"), torch.float32)
    attach_lora_slots(loaded.model, max_loras=3)
    info = ModelInfo.from_model(loaded.model)
    for slot, path in adapters.items():
        load_adapter_slot(loaded.model, slot, validate_adapter_dir(path, info, max_lora_rank=16).updates)
    # A long run (GEMMs), two short runs (gathered) and a base sequence, in one packed step.
    prompts = [(0, list(range(3, 23))), (1, [5, 9, 22, 41, 7]), (-1, [8, 8, 120, 64]), (0, [17, 30, 2])]
    seqs = [Sequence(str(i), p, SamplingParams()) for i, (_, p) in enumerate(prompts)]
    for i, seq in enumerate(seqs):
        seq.block_table.extend(range(8 * i, 8 * i + 8))
    batch = build_forward_batch([(s, len(s)) for s in seqs], 4, torch.device("cpu"), [slot for slot, _ in prompts])
    cache = KVCache(loaded.spec, num_blocks=32, block_size=4, dtype=torch.float32, device="cpu")
    lora_batch = make_lora_batch(batch.adapter_slots)
    assert lora_batch.gemm_runs and lora_batch.gather_slots == {0, 1}
    with torch.no_grad():
        logits = loaded.model.compute_logits(loaded.model(batch, cache, lora_batch))
    for i, (slot, prompt) in enumerate(prompts):
        got = logits[batch.query_start[i] : batch.query_start[i + 1]]
        want = peft_logits(tiny_model_dir, adapters.get(slot), prompt)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        if slot >= 0:
            assert not torch.allclose(got, peft_logits(tiny_model_dir, None, prompt), atol=1e-2)


@pytest.mark.parametrize(
    "tokens",
    [[5] * 4 + [1] * 4 + [0] * 4, [5] * 4 + [-1] + [1] * 6 + [0] * 4 + [5] * 5, [3] * 4 + [2] * 5 + [3] * 4],
    ids=["back-to-back", "padded", "wide-ranks"],
)
def test_grouped_runs_match_reference(tokens):
    """Several GEMM runs of one granule count are served by one batched GEMM pair, DoRA included."""
    linear, loaded = _layer_with_adapters()
    token_slots = torch.tensor(tokens)
    x = torch.randn(len(tokens), IN)
    batch = make_lora_batch(token_slots, min_gemm_run=4)
    assert len(batch.gemm_runs) >= 3 and batch.gather_rows is None
    with torch.no_grad():
        got = linear(x, batch)
    torch.testing.assert_close(got, _expected(linear, loaded, x, token_slots), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "tokens", [[5] * 37, [5] * 37 + [1] * 45 + [-1] + [0] * 70, [3] * 33 + [2] * 50], ids=["one", "grouped", "ranks"]
)
def test_long_bf16_runs_run_at_padded_row_counts_and_still_match_reference(tokens):
    """oneDNN compiles a kernel per GEMM shape, so bf16 runs on a CPU are padded to `padded_rows` rows."""
    linear, loaded = _layer_with_adapters()
    bf16 = TargetLinear(linear.weight.detach().to(torch.bfloat16), SLICES)
    bf16.enable_adapters(MAX_LORAS)
    for slot, pieces in loaded.items():
        bf16.lora.load_slot(slot, {n: LoraWeights(w.a, w.b, w.g) for n, w in pieces.items()})
    token_slots = torch.tensor(tokens)
    x = torch.randn(len(tokens), IN).to(torch.bfloat16)
    batch = make_lora_batch(token_slots)
    runs = tuple((start, end) for start, end, _ in batch.gemm_runs)
    assert batch.runs_plan(runs, padded=True).length == padded_rows(max(end - start for start, end in runs)) > 32
    with torch.no_grad():
        got = bf16(x, batch)
    want = _expected(linear, loaded, x.float(), token_slots)
    torch.testing.assert_close(got.float(), want, atol=5e-2, rtol=5e-2)
