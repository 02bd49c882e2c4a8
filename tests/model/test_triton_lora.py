"""The Triton mixed-adapter kernels against `lora_reference`, on CPU under Triton's interpreter (on a GPU natively).

`backend.triton_kernels` is forced on, so the layers of `tests/model/test_lora.py` serve through
`server.model.triton.lora` as a CUDA forward would: mixed ranks (1 to 64), DoRA, an empty slot, single-token and
long segments, and the merged adapter's correction.
"""

from __future__ import annotations

import pytest
import torch

from server.model import backend
from server.model.linear import TargetLinear
from server.model.lora import lora_reference
from server.model.routing import BASE_SLOT, MERGED_SLOT, make_lora_batch
from tests.model.test_lora import IN, MAX_LORAS, SLICES, TOKENS, _expected, _layer_with_adapters, _random_update


@pytest.fixture(autouse=True)
def _triton(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backend, "triton_kernels", lambda device: True)


def _moved(linear: TargetLinear, loaded, device: torch.device, dtype: torch.dtype) -> TargetLinear:
    """The same layer and adapters in `dtype` on `device`."""
    moved = TargetLinear(linear.weight.detach().to(device=device, dtype=dtype), SLICES)
    moved.enable_adapters(MAX_LORAS)
    for slot, pieces in loaded.items():
        moved.lora.load_slot(slot, {name: w.to(device=device, dtype=dtype) for name, w in pieces.items()})
    return moved


@pytest.mark.parametrize(
    "tokens",
    [TOKENS, [5, 5, 1, 3, 0, 2], [3, -1, -1, -1, 1], [2], [BASE_SLOT] * 3, [4, 4], [3] * 20 + [1] * 17 + [-1, 3]],
    ids=["mixed", "decode", "base-and-dora", "one-token", "base-only", "empty-slot-only", "long-segments"],
)
def test_triton_lora_matches_reference(tokens):
    linear, loaded = _layer_with_adapters()
    token_slots = torch.tensor(tokens)
    x = torch.randn(len(tokens), IN)
    want = _expected(linear, loaded, x, token_slots)
    with torch.no_grad():
        got = linear(x, make_lora_batch(token_slots))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_triton_lora_bfloat16_within_rounding():
    linear, loaded = _layer_with_adapters()
    token_slots = torch.tensor(TOKENS)
    x = torch.randn(len(TOKENS), IN).bfloat16()
    want = _expected(linear, loaded, x.float(), token_slots)
    with torch.no_grad():
        got = _moved(linear, loaded, torch.device("cpu"), torch.bfloat16)(x, make_lora_batch(token_slots))
    torch.testing.assert_close(got.float(), want, atol=5e-2, rtol=2e-2)


def test_triton_merged_correction_matches_reference():
    linear, loaded = _layer_with_adapters()
    merged = {"q_proj": _random_update(8, 32, dora=True), "v_proj": _random_update(4, 16, dora=False)}
    weight = linear.weight.detach().clone()
    for name, update in merged.items():
        start, end = SLICES[name]
        update.merge_into(linear.weight.detach()[start:end], weight[start:end])
    token_slots = torch.tensor([MERGED_SLOT, MERGED_SLOT, 1, 1, BASE_SLOT, 0, MERGED_SLOT, 3, 3, 3, 5])
    x = torch.randn(len(token_slots), IN)
    linear.serve_merged(weight)
    linear.lora.set_correction(merged)
    want = x @ weight.T
    for name, (start, end) in SLICES.items():
        updates = {slot: pieces[name] for slot, pieces in loaded.items() if name in pieces}
        lora_reference(x, want[:, start:end], updates, token_slots, merged.get(name))
    with torch.no_grad():
        got = linear(x, make_lora_batch(token_slots))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not got[token_slots == BASE_SLOT].equal((x @ weight.T)[token_slots == BASE_SLOT])  # corrected


@pytest.mark.cuda
def test_triton_lora_on_cuda_matches_reference():
    linear, loaded = _layer_with_adapters()
    token_slots = torch.tensor(TOKENS)
    x = torch.randn(len(TOKENS), IN)
    want = _expected(linear, loaded, x, token_slots)
    on_gpu = _moved(linear, loaded, torch.device("cuda"), torch.float32)
    with torch.no_grad():
        got = on_gpu(x.cuda(), make_lora_batch(token_slots.cuda()))
    torch.testing.assert_close(got.cpu(), want, atol=1e-5, rtol=1e-5)
