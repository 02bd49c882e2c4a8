"""The fused bf16 CPU kernels: bit-identical to the torch ops they replace, and a whole forward with them."""

from __future__ import annotations

import threading

import pytest
import torch

from server.adapters.packing import packed
from server.model import kernels
from server.model.layers import RMSNorm, apply_rotary, gated_act
from server.model.linear import TargetLinear
from server.model.loader import load_model
from server.model.lora import lora_reference
from server.model.lora_weights import LoraWeights
from server.model.rope import RopeSpec, RotaryEmbedding
from server.model.routing import make_lora_batch
from tests.families import lockstep_logits, make_family_checkpoint, near_tie_margins

BF16 = torch.bfloat16
ops = torch.ops.loraplex


def _rotary(head_dim: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return RotaryEmbedding({"full": RopeSpec.plain(head_dim, 1e4)}).tables(positions, BF16)["full"]


@pytest.fixture(scope="module", autouse=True)
def _built() -> None:
    # CI builds them (g++ and ninja come with .ci/run); a machine that cannot must say why, not skip silently
    assert kernels.load_fused_kernels() is None, kernels.load_fused_kernels()


@pytest.mark.parametrize("hidden", [576, 64, 100])  # 100: a tail shorter than one vector
def test_rms_norm_and_residual_add_round_as_torch_does(hidden):
    x, residual = (torch.randn(37, hidden).mul(4).to(BF16) for _ in range(2))
    weight = torch.rand(hidden).add(0.5).to(BF16)
    norm = RMSNorm(weight, 1e-5)
    assert ops.rms_norm(x, weight, 1e-5).equal(norm(x))
    ours, theirs = residual.clone(), residual.clone()
    assert ops.add_rms_norm(x, ours, weight, 1e-5).equal(norm(x, theirs))
    assert ours.equal(theirs) and ours.equal(residual + x)  # the residual stream is added to in place


@pytest.mark.parametrize("width", [1536, 64, 40])
def test_silu_mul_rounds_as_torch_does(width):
    gate_up = torch.randn(33, 2 * width).mul(5).to(BF16)
    assert ops.silu_mul(gate_up).equal(gated_act(gate_up))


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(9, 3, 64), (4, 2, 16), (2, 1, 40)])
def test_rope_and_cache_rotates_in_place_and_writes_the_slots(heads, kv_heads, head_dim):
    tokens, block_size = 11, 4
    cos, sin = _rotary(head_dim, torch.randint(0, 512, (tokens,)))
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim).to(BF16)
    slots = torch.randperm(6 * block_size)[:tokens]
    k_cache = torch.zeros(6, kv_heads, head_dim, block_size, dtype=BF16)
    v_cache = torch.zeros(6, kv_heads, block_size, head_dim, dtype=BF16)
    rotated = qkv.clone()
    ops.rope_and_cache(rotated, cos, sin, k_cache, v_cache, slots, heads, kv_heads)
    rotating = (heads + kv_heads) * head_dim
    want = apply_rotary(qkv[:, :rotating].view(tokens, -1, head_dim), cos, sin)
    assert rotated[:, :rotating].view_as(want).equal(want)
    assert rotated[:, rotating:].equal(qkv[:, rotating:])  # values are not rotated
    blocks, offsets = slots // block_size, slots % block_size
    assert k_cache[blocks, :, :, offsets].equal(want[:, heads:])
    assert v_cache[blocks, :, offsets].equal(qkv[:, rotating:].view(tokens, kv_heads, head_dim))


def test_bad_arguments_raise_before_anything_is_written():
    qkv = torch.randn(2, 4 * 16).to(BF16)
    cos, sin = _rotary(16, torch.tensor([0, 1]))
    k_cache = torch.zeros(2, 1, 16, 4, dtype=BF16)
    v_cache = torch.zeros(2, 1, 4, 16, dtype=BF16)
    before = qkv.clone()
    with pytest.raises(RuntimeError, match="KV slot out of range"):
        ops.rope_and_cache(qkv, cos, sin, k_cache, v_cache, torch.tensor([3, 8]), 2, 1)
    assert qkv.equal(before) and k_cache.count_nonzero() == 0
    with pytest.raises(RuntimeError, match="bfloat16"):
        ops.silu_mul(torch.randn(2, 8))
    q, out = torch.randn(1, 2, 16).to(BF16), torch.empty(1, 2, 16, dtype=BF16)
    tables, lens = torch.tensor([[0, 5]]), torch.tensor([6])
    with pytest.raises(RuntimeError, match="block out of range"):
        ops.decode_attention(q, k_cache, v_cache, torch.tensor([0]), tables, lens, out, 0.25, 0)


@pytest.mark.parametrize("family", [None, "mistral", "qwen3", "llama3"])  # None: the tiny Llama
def test_the_fused_forward_agrees_with_the_torch_op_forward(tiny_model_dir, tmp_path, family):
    """Prefill, a chunked prefill and decode steps of a bf16 model: same greedy tokens, logits a few ulps apart
    (decode attention sums in float32 where the torch path rounds its scores to bf16). Mistral's sliding window runs
    in the decode kernel, Qwen3's q/k norms before the fused rotary, Llama 3's biases and scaled rotary around them."""
    model_dir = tiny_model_dir if family is None else make_family_checkpoint(tmp_path, family)
    fused, plain = (load_model(model_dir, torch.device("cpu"), BF16, flag) for flag in (True, False))
    assert fused.model.fused and not plain.model.fused
    prompts = [[5, 9, 22, 41, 7, 3, 99], [17], list(range(3, 40))]
    for want, got in lockstep_logits([plain, fused], prompts, 10):  # both continue with the torch-op path's tokens
        torch.testing.assert_close(got, want, atol=0.05, rtol=0.05)
        # a different greedy token only where the torch-op path itself has a near-tie (bf16 rounding decides)
        assert (near_tie_margins(want, got) <= 0.05).all()


@pytest.mark.parametrize(("family", "reason"), [
    ("gemma2", "RMSNorm scaled by (1 + w) in float32, gelu_tanh MLP activation, attention-logit soft-capping"),
    ("phi3", "partial rotary embeddings"),
])  # fmt: skip
def test_families_the_kernels_do_not_cover_run_torch_ops_and_say_why(tmp_path, caplog, family, reason):
    caplog.set_level("INFO", logger=kernels.__name__)
    loaded = load_model(make_family_checkpoint(tmp_path, family), torch.device("cpu"), BF16)
    assert not loaded.model.fused and loaded.spec.unfused_reason() == reason
    assert f"fused kernels off for this model ({reason})" in caplog.text


def test_fused_kernels_apply_to_bf16_on_cpu_only():
    cpu = torch.device("cpu")
    assert kernels.use_fused_kernels(BF16, cpu)
    assert not kernels.use_fused_kernels(torch.float32, cpu)  # the exact mode keeps the torch ops
    assert not kernels.use_fused_kernels(BF16, cpu, enabled=False)


def test_a_machine_without_a_compiler_is_told_what_to_install(monkeypatch):
    monkeypatch.setattr(kernels.shutil, "which", lambda tool: None)
    reason = kernels.load_fused_kernels.__wrapped__()
    assert "not on PATH" in reason and "g++" in reason


@pytest.mark.parametrize("in_features", [32, 576, 33])  # 33: an odd last row of A for the 8-rank granules
def test_gathered_lora_on_the_fused_path_matches_the_reference(in_features):
    """Per-token (BGMV) deltas of ranks 1-64, LoRA and DoRA, base tokens between: within bf16 rounding of the exact
    float32 reference, and no further from it than the torch-op path."""
    slices = {"q_proj": (0, 64), "v_proj": (64, 96)}
    adapters = {0: (8, False), 1: (24, True), 2: (64, False), 3: (1, False)}  # slot -> (rank, DoRA)
    weight = torch.randn(96, in_features) / in_features**0.5
    updates = {
        slot: {
            name: LoraWeights(
                a=torch.randn(rank, in_features) / in_features**0.5,
                b=torch.randn(end - start, rank) / rank**0.5,
                g=1 + 0.3 * torch.randn(end - start) if dora else None,
            )
            for name, (start, end) in slices.items()
        }
        for slot, (rank, dora) in adapters.items()
    }
    token_slots = torch.tensor([0, 1, -1, 2, 3, 3, 1, -1, 0, 2, 2])
    x = torch.randn(len(token_slots), in_features).to(BF16)
    want = x.float() @ weight.T
    for name, (start, end) in slices.items():
        lora_reference(x.float(), want[:, start:end], {s: u[name] for s, u in updates.items()}, token_slots)
    errors = {}
    for fused in (True, False):
        layer = TargetLinear(weight.to(BF16), slices)
        layer.enable_adapters(4, fused)
        for slot, pieces in updates.items():
            layer.lora.load_slot(slot, pieces)
        with torch.inference_mode():
            got = layer(x, make_lora_batch(token_slots)).float()
        torch.testing.assert_close(got, want, atol=0.1, rtol=0.03)
        errors[fused] = (got - want).abs().mean().item()
    assert errors[True] <= errors[False] * 1.05


@pytest.mark.parametrize("layout", ["packed", "as loaded"])
def test_fused_slot_fills_write_what_the_torch_op_fills_write(layout):
    """`lora_fill` against `_Slice._copy`, buffer for buffer, over loads that grow the rank capacity, shrink and
    grow a slot's rank, cross granule edges, switch DoRA on and off and clear slots: host weights as the server
    keeps them (bf16, A and B transposed) and as read (float32, untransposed)."""
    slices = {"q_proj": (0, 64), "v_proj": (64, 96)}
    in_features = 33

    def update(rank: int, dora: bool = False) -> dict[str, LoraWeights]:
        pieces = {
            name: LoraWeights(
                a=torch.randn(rank, in_features),
                b=torch.randn(end - start, rank),
                g=torch.rand(end - start) + 0.5 if dora else None,
            )
            for name, (start, end) in slices.items()
        }
        return packed(pieces, BF16) if layout == "packed" else pieces

    loads = [(0, update(8)), (1, update(3, dora=True)), (0, update(64)), (1, update(24)), (0, update(17, True)),
             (2, update(16)), (0, {}), (1, {"q_proj": update(40)["q_proj"]}), (2, update(1)), (1, {})]  # fmt: skip
    weight = torch.randn(96, in_features).to(BF16)
    layers = {fused: TargetLinear(weight, slices) for fused in (True, False)}
    for fused, layer in layers.items():
        layer.enable_adapters(3, fused)
    for n, (slot, pieces) in enumerate(loads):
        for layer in layers.values():
            layer.lora.load_slot(slot, pieces)
        for name in slices:
            got, want = (layers[fused].lora._slices[name] for fused in (True, False))
            assert (got.rank, got.dora, got.cap) == (want.rank, want.dora, want.cap), (n, name)
            for buffer in ("a_t", "b_t", "g", "row_ranks") if got.cap else ():
                assert getattr(got, buffer).equal(getattr(want, buffer)), (n, name, buffer)


def test_a_fill_that_does_not_fit_the_buffers_is_refused():
    a_t, b_t = torch.zeros(3, 2, 33, 16, dtype=BF16), torch.zeros(3, 32, 64, dtype=BF16)
    ranks = torch.zeros(3, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="capacity"):
        ops.lora_fill(a_t, b_t, ranks, 1, 0, torch.randn(40, 33).to(BF16), torch.randn(64, 40).to(BF16))
    with pytest.raises(RuntimeError, match="for this projection"):
        ops.lora_fill(a_t, b_t, ranks, 1, 0, torch.randn(8, 32).to(BF16), torch.randn(64, 8).to(BF16))
    with pytest.raises(RuntimeError, match="out of range"):
        ops.lora_fill(a_t, b_t, ranks, 3, 0, None, None)
    assert not a_t.any() and not b_t.any() and not ranks.any()


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim", "block_size"), [
    (9, 3, 64, 16),  # the default model
    (4, 4, 40, 4),  # no GQA; features not a whole vector
    (10, 1, 16, 32),  # a group past the 8 heads kept in registers; blocks of two vectors
])  # fmt: skip
@pytest.mark.parametrize("window", [0, 5, 20])
def test_decode_attention_reads_each_rows_blocks_in_place(heads, kv_heads, head_dim, block_size, window):
    lens, num_blocks = [1, 7, 50], 16
    tables = torch.stack([torch.randperm(num_blocks)[: -(-max(lens) // block_size)] for _ in lens])
    k_cache = torch.randn(num_blocks, kv_heads, head_dim, block_size).to(BF16)
    v_cache = torch.randn(num_blocks, kv_heads, block_size, head_dim).to(BF16)
    q = torch.randn(5, heads, head_dim).to(BF16)  # rows 4, 0, 2 decode; the others are left alone
    out = torch.full_like(q, 7.0)
    tokens = torch.tensor([4, 0, 2])
    ops.decode_attention(q, k_cache, v_cache, tokens, tables, torch.tensor(lens), out, head_dim**-0.5, window)
    assert out[[1, 3]].eq(7.0).all()
    group = heads // kv_heads
    for row, (token, length) in enumerate(zip(tokens.tolist(), lens, strict=True)):
        blocks = tables[row, : -(-length // block_size)]
        start = max(0, length - window) if window else 0  # a sliding window sees the last `window` keys
        keys = k_cache[blocks].permute(1, 0, 3, 2).reshape(kv_heads, -1, head_dim)[:, start:length].float()
        values = v_cache[blocks].transpose(0, 1).reshape(kv_heads, -1, head_dim)[:, start:length].float()
        scores = torch.einsum("hd,hld->hl", q[token].float(), keys.repeat_interleave(group, 0)) * head_dim**-0.5
        want = torch.einsum("hl,hld->hd", scores.softmax(-1), values.repeat_interleave(group, 0))
        torch.testing.assert_close(out[token].float(), want, atol=1e-2, rtol=1e-2)


def test_kernels_leave_the_calling_threads_core_count_alone():
    """A thread computing with 2 cores keeps 2 after its first kernel call, although another thread pinned itself
    to one core since (as adapter loader threads do): the engine thread, which loaded the model with 2 cores, must not
    fall back to one at its first fused step."""
    if torch.get_num_threads() < 2:
        pytest.skip("needs 2 cores")
    seen = []

    def engine() -> None:
        torch.set_num_threads(2)
        torch.randn(1 << 20).exp_()  # torch's first parallel op on this thread (the model load, in the engine)
        pinned = threading.Thread(target=torch.set_num_threads, args=(1,))
        pinned.start()
        pinned.join()
        ops.silu_mul(torch.randn(64, 2048).to(BF16))  # large enough to run in parallel
        seen.append(torch.get_num_threads())

    thread = threading.Thread(target=engine)
    thread.start()
    thread.join()
    assert seen == [2]
