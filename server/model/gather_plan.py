"""Index plans of `server.model.lora`: rows each gathered token reads (BGMV), how GEMM runs are batched (SGMV)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from server.model.gemm_shapes import padded_rows


@dataclass(frozen=True)
class GatherPlan:
    """Indices for one per-token (BGMV) pass: each gathered token reads its own slot's rows, at its own rank.

    A token of rank r reads k = ceil(r / g) granules of its slot's A (one shrink bag each) and r rows of its B
    (one expand bag); tokens with nothing to add (base, GEMM-served, slot not targeting this projection) get none.
    """

    bag_tokens: torch.Tensor  # [B] token of each shrink bag, B = sum of k over tokens
    shrink_index: torch.Tensor  # [B, in] row of `a_t.view(-1, g)` holding each input feature of the bag's granule
    expand_index: torch.Tensor  # [E] row of `b_t.view(-1, out)`, token after token, E = sum of r over tokens
    expand_offsets: torch.Tensor  # [T] start of each token's expand bag in `expand_index`
    expand_inputs: torch.Tensor  # [E] position in the flattened shrink output [B * g] feeding each expand row


def build_gather_plan(
    rows: torch.Tensor, row_ranks: Mapping[int, int], in_features: int, granules: int, width: int, device: torch.device
) -> GatherPlan:
    """The plan for tokens reading buffer rows `rows` [T] (0 = nothing), each row at its rank in `row_ranks`.

    Index arithmetic on the host (no device sync), then one copy of each index to the device.
    """
    tokens = torch.arange(rows.numel())
    rank_of_row = torch.zeros(int(rows.max()) + 1, dtype=torch.int64)
    for row, rank in row_ranks.items():
        rank_of_row[row] = rank
    r = rank_of_row[rows]  # [T] rank each token reads here, 0 = nothing to add
    k = -(-r // width)  # [T] granules each token reads
    bag_tokens = torch.repeat_interleave(tokens, k)  # [B]
    first_bag = torch.cumsum(k, 0) - k  # [T]
    granule = torch.arange(bag_tokens.numel()) - first_bag[bag_tokens]  # [B]
    offsets = torch.cumsum(r, 0) - r  # [T]
    expand_tokens = torch.repeat_interleave(tokens, r)  # [E]
    component = torch.arange(expand_tokens.numel()) - offsets[expand_tokens]  # [E], rank component c < r
    first_rows = (rows[bag_tokens] * granules + granule).to(device)  # [B], granule's block of `in` rows
    return GatherPlan(
        bag_tokens=bag_tokens.to(device),
        shrink_index=first_rows[:, None] * in_features + torch.arange(in_features, device=device),
        expand_index=(rows[expand_tokens] * granules * width + component).to(device),
        expand_offsets=offsets.to(device),
        expand_inputs=(first_bag[expand_tokens] * width + component).to(device),
    )


@dataclass(frozen=True)
class RunsPlan:
    """Indices for one batched GEMM pair over n runs of tokens (grouped SGMV), each run padded to the longest, L.

    `pad_index` is None when the runs are back to back and equally long: the batch is then a view of the tokens.
    """

    first: int  # first token of the first run
    last: int  # end of the last run
    length: int  # L, the longest run (or more: see `build_runs_plan`)
    pad_index: torch.Tensor | None  # [n * L] token read at each padded position (padding repeats the run's first)
    kept: torch.Tensor | None  # [N] padded position of each real token, N = total run length
    tokens: torch.Tensor | None  # [N] the token itself


def build_runs_plan(runs: tuple[tuple[int, int], ...], device: torch.device, padded: bool = False) -> RunsPlan:
    """The plan for token runs `[start, end)`, in order; `padded`: L is `padded_rows` of the longest run."""
    starts = torch.tensor([start for start, _ in runs])
    lengths = torch.tensor([end - start for start, end in runs])
    length = padded_rows(int(lengths.max())) if padded else int(lengths.max())
    back_to_back = all(runs[i][1] == runs[i + 1][0] for i in range(len(runs) - 1))
    if back_to_back and bool((lengths == length).all()):
        return RunsPlan(runs[0][0], runs[-1][1], length, None, None, None)
    step = torch.arange(length)  # [L]
    inside = step[None, :] < lengths[:, None]  # [n, L]
    pad_index = starts[:, None] + torch.where(inside, step[None, :], 0)  # [n, L]
    kept = torch.nonzero(inside.flatten()).flatten()  # [N]
    return RunsPlan(
        runs[0][0], runs[-1][1], length,
        pad_index.flatten().to(device), kept.to(device), pad_index.flatten()[kept].to(device),
    )  # fmt: skip
