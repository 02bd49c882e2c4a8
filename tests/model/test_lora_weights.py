"""The LoRA/DoRA maths of one update: forward and inverse, merged weight, DoRA factor, shape and finiteness checks."""

from __future__ import annotations

import pytest
import torch

from server.model.lora_weights import LoraWeights

IN, OUT, RANK = 24, 16, 4


def _update(dora: bool) -> LoraWeights:
    g = 1 + 0.3 * torch.randn(OUT) if dora else None
    return LoraWeights(a=torch.randn(RANK, IN) / IN**0.5, b=torch.randn(OUT, RANK) / RANK**0.5, g=g)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_forward_is_the_formula_and_remove_undoes_it(dora):
    w, weight, x = _update(dora), torch.randn(OUT, IN), torch.randn(5, IN)
    base = x @ weight.T
    got = w.apply(x, base.clone())
    g = torch.ones(OUT) if w.g is None else w.g
    torch.testing.assert_close(got, g * (base + (x @ w.a.T) @ w.b.T), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(w.dense(), w.b @ w.a)
    torch.testing.assert_close(w.remove(x, got), base, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_weight_serves_the_forward(dora, dtype):
    w, weight, x = _update(dora), torch.randn(OUT, IN), torch.randn(5, IN)
    merged = w.merge_into(weight.to(dtype), torch.empty(OUT, IN, dtype=dtype))
    assert merged.dtype == dtype
    want = w.apply(x, x @ weight.T)
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(x @ merged.float().T, want, atol=tolerance, rtol=tolerance)


def test_dora_factor_is_the_magnitude_over_the_row_norm():
    w, weight = _update(dora=False), torch.randn(OUT, IN)
    norms = torch.linalg.norm(weight + w.b @ w.a, dim=1)
    magnitude = torch.rand(OUT) + 0.5
    torch.testing.assert_close(w.with_dora(weight, magnitude).g, magnitude / norms)
    plain = w.with_dora(weight, norms)  # m = ‖W + s·B·A‖: the DoRA update is the LoRA update
    torch.testing.assert_close(plain.g, torch.ones(OUT))
    assert w.g is None and plain.a is w.a and plain.b is w.b


def test_shape_and_invertibility_checks():
    w = _update(dora=True)
    w.check_shape(IN, OUT)
    for in_features, out_features in ((IN + 1, OUT), (IN, OUT - 1)):
        with pytest.raises(ValueError, match="do not fit"):
            w.check_shape(in_features, out_features)
    assert w.is_invertible and _update(dora=False).is_invertible
    g = w.g.clone()
    g[3] = 0
    assert not LoraWeights(w.a, w.b, g).is_invertible


def test_finiteness_bound_of_a_merge():
    w = _update(dora=True)
    update, g = w.max_abs
    assert update >= float((w.b @ w.a).abs().max()) and g == float(w.g.abs().max())
    assert w.merge_is_surely_finite(base_max=10.0, dtype=torch.bfloat16)
    huge = LoraWeights(w.a * 1e20, w.b * 1e20, w.g)
    assert huge.merge_is_surely_finite(1.0, torch.float64) is False  # the float32 sum bounds every dtype
    assert not huge.merge_is_surely_finite(1.0, torch.float32)


def test_to_moves_every_tensor():
    w = _update(dora=True).to(dtype=torch.float64)
    assert {t.dtype for t in (w.a, w.b, w.g)} == {torch.float64}
    assert _update(dora=False).to(dtype=torch.float64).g is None
