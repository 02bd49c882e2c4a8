"""One adapter's update of one projection, and every operation the server does with it: the LoRA/DoRA maths.

For a target projection `y = x·Wᵀ` and an adapter with A [r, in], B [out, r] and scale s (folded into B at load):

- LoRA:  `y = x·Wᵀ + (x·Aᵀ)·(s·B)ᵀ`, merged `W' = W + s·B·A`.
- DoRA:  `y = g ⊙ (x·Wᵀ + (x·Aᵀ)·(s·B)ᵀ)`, merged `W' = g ⊙ (W + s·B·A)`, with `g = m / ‖W + s·B·A‖_row`.
  The base is frozen, so `g` is a constant computed once at load (`with_dora`); plain LoRA is the case g = 1.

As in PEFT's LoRA variants, DoRA is a strategy on the same update rather than a copy of it: `with_dora` is its init,
`merge_into` its merge, `apply` its forward and `remove` the inverse the merged mode needs. The slot buffers of
`server.model.lora` hold the same A, s·B and g laid out per device slot; their fast paths end with `scale_outputs_`,
the one place DoRA's factor meets an output.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property

import torch


def scale_outputs_(y: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """DoRA's last step, in place: `y = g ⊙ y`; y: [L, out], g: [out] or one row per token [L, out]."""
    return y.mul_(g)


@dataclass(frozen=True)
class LoraWeights:
    """One adapter's update of one projection, ready to serve: `delta = (x·aᵀ)·bᵀ`, the scale already in `b`."""

    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r], multiplied by the scale s
    g: torch.Tensor | None = None  # [out], DoRA factor m / ‖W + s·B·A‖_row; None for plain LoRA

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def to(self, **opts) -> LoraWeights:
        """The same update with every tensor moved by `Tensor.to(**opts)` (device, dtype)."""
        return LoraWeights(self.a.to(**opts), self.b.to(**opts), None if self.g is None else self.g.to(**opts))

    def check_shape(self, in_features: int, out_features: int) -> None:
        """Raise `ValueError` unless this update fits a projection of `in_features` -> `out_features`."""
        r = self.rank
        g_ok = self.g is None or self.g.shape == (out_features,)
        if self.a.shape != (r, in_features) or self.b.shape != (out_features, r) or not g_ok:
            raise ValueError(f"LoRA shapes {tuple(self.a.shape)}, {tuple(self.b.shape)} do not fit this layer")

    def dense(self, device: torch.device | None = None) -> torch.Tensor:
        """The dense update `s·B·A` [out, in] in float32 (on `device`, default where the update lives)."""
        opts = {"device": device, "dtype": torch.float32}
        return self.b.to(**opts) @ self.a.to(**opts)

    def with_dora(self, weight: torch.Tensor, magnitude: torch.Tensor) -> LoraWeights:
        """DoRA's init: this update with `g = m / ‖W + s·B·A‖_row`, in float32 on W's device.

        Exactly PEFT's `DoraLinearLayer.get_weight_norm` (L2 norm over the input dimension, no epsilon); a row of
        zero norm gives a non-finite factor, which the caller refuses.
        """
        weight = weight.float()  # [out, in]
        direction = weight + self.dense(weight.device)
        return replace(self, g=magnitude.float().to(weight.device) / torch.linalg.norm(direction, dim=1))

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        # x: [L, in] -> [L, out], the low-rank term (x·Aᵀ)·(s·B)ᵀ
        return (x @ self.a.T) @ self.b.T

    def apply(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The adapter's forward on a run of tokens, in place: `y = g ⊙ (y + (x·Aᵀ)·(s·B)ᵀ)`, y being x·Wᵀ [L, out]."""
        y += self.delta(x)
        return y if self.g is None else scale_outputs_(y, self.g)

    @property
    def is_invertible(self) -> bool:
        """Whether `remove` can undo this update: DoRA's factor has no zero."""
        return self.g is None or bool(self.g.ne(0).all())

    def remove(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The inverse of `apply`, in place: `y = y / g − (x·Aᵀ)·(s·B)ᵀ`; x·W'ᵀ back to x·Wᵀ for unmerged tokens."""
        # x: [L, in], y: [L, out]
        if self.g is not None:
            y.div_(self.g)
        y.addmm_(x @ self.a.T, self.b.T, alpha=-1)
        return y

    def merge_into(self, base: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The merged weight `out = g ⊙ (W + s·B·A)`, summed in float32 and stored in out's dtype.

        base, out: [out, in] (the projection's rows of W and of the merge buffer).
        """
        opts = {"device": base.device, "dtype": torch.float32}
        a, b = self.a.to(**opts), self.b.to(**opts)
        if out.dtype == torch.float32:  # sum straight into the buffer
            torch.addmm(base, b, a, out=out)
            if self.g is not None:
                out.mul_(self.g.to(**opts)[:, None])
            return out
        merged = torch.addmm(base.float(), b, a)
        if self.g is not None:
            merged.mul_(self.g.to(**opts)[:, None])
        return out.copy_(merged)

    @cached_property
    def max_abs(self) -> tuple[float, float]:
        """(r · max|b| · max|a|, max|g|): bounds on |(b·a)[i, j]| and on the DoRA factor (1 for LoRA)."""
        update = self.rank * float(self.b.abs().max()) * float(self.a.abs().max())
        return update, 1.0 if self.g is None else float(self.g.abs().max())

    def merge_is_surely_finite(self, base_max: float, dtype: torch.dtype) -> bool:
        """Whether merging into a W of max|W| = `base_max` stays finite in `dtype`, from bounds alone (no pass over W).

        Every partial sum is at most max|W| + r·max|b|·max|a| in magnitude; half the largest value leaves room for
        rounding.
        """
        update, g = self.max_abs
        return (base_max + update) * g <= min(torch.finfo(dtype).max, torch.finfo(torch.float32).max) / 2
