"""Next-token sampling: greedy, temperature, top-k, top-p and min_tokens, one generator per request.

Reproducibility rule: a request's tokens depend only on its logits, its parameters and its own
generator, never on what else shares the batch. Each sampled row consumes exactly one float64
uniform from its generator per step and every filter below works row by row, so a seeded request
gives the same tokens alone or in any batch.

Why inverse-CDF sampling on the logits' device: generators stay on the CPU (cheap, portable, easy to
seed), but copying `[L, V]` probabilities to the CPU every step would cost tens of MB per step for
large batches, and the exponential-race trick needs `[L, V]` CPU noise copied the other way. Drawing
one uniform per row on the CPU and inverting the cumulative distribution on the device moves only
`[S]` uniforms in and `[L]` token ids out: one host-device sync per step.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from server.engine.penalties import apply_min_p, apply_penalties
from server.engine.sequence import SamplingParams
from server.engine.structured import GrammarMasks, GrammarState

log = logging.getLogger(__name__)

_SEED_BOUND = 2**63 - 1
INVALID_TOKEN = -1  # a row whose own sampling failed: its request ends with an error, the other rows go on


class GeneratorFactory:
    """Creates per-request CPU generators: from the request's seed, else from the server-level seed."""

    def __init__(self, server_seed: int) -> None:
        self._source = torch.Generator().manual_seed(server_seed)

    def create(self, seed: int | None) -> torch.Generator:
        """A fresh generator; requests without a seed draw theirs from the server seed, in arrival order."""
        if seed is None:
            seed = int(torch.randint(_SEED_BOUND, (), generator=self._source))
        return torch.Generator().manual_seed(seed)


@dataclass(frozen=True)
class SamplingRow:
    """What the sampler needs to know about one row of logits."""

    params: SamplingParams
    generator: torch.Generator | None  # CPU generator; may be None for greedy rows
    num_generated: int  # output tokens so far, before this step's token
    prompt_token_ids: Sequence[int] = ()  # read by the penalties only
    output_token_ids: Sequence[int] = ()
    request_id: str = ""  # for the log, when this row fails
    grammar: GrammarState | None = None  # constrained rows only
    draft_grammars: tuple[GrammarState, ...] = ()  # speculating constrained rows: the grammar after each proposal


class Sampler:
    """Turns the logits of L sequences into their next token ids, each row with its own parameters."""

    def __init__(self, eos_token_ids: Iterable[int]) -> None:
        # Ids banned while a row has generated fewer than min_tokens: EOS and any other stop token ids.
        self.eos_token_ids = tuple(sorted(set(eos_token_ids)))

    def sample(self, logits: torch.Tensor, rows: list[SamplingRow], masks: GrammarMasks | None = None) -> list[int]:
        """Next token id of each row; `logits: [L, V]` float32 on any device, one row per entry of `rows`.

        `masks` holds the grammar masks of the constrained rows, when there are any.

        A row whose logits or probabilities are not finite, or whose generator fails, gets INVALID_TOKEN (logged
        with its request id); every other row samples exactly as it would without it.
        """
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits {tuple(logits.shape)} do not match {len(rows)} rows")
        uniforms, failed = draw_uniforms(rows)
        logits = apply_penalties(
            logits, [r.params for r in rows], [(r.prompt_token_ids, r.output_token_ids) for r in rows]
        )
        logits = self._ban_eos(logits, rows)
        if masks is not None:
            logits = masks.apply(logits)
        next_ids = logits.argmax(dim=-1)  # [L]
        sampled = [i for i, row in enumerate(rows) if not row.params.greedy]
        if sampled:
            idx = torch.tensor(sampled, device=logits.device)
            next_ids[idx] = self._draw(logits[idx], [rows[i] for i in sampled], uniforms[sampled])
        return checked_token_ids(next_ids, logits, rows, failed)

    def _ban_eos(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """Logits with EOS and stop token ids at -inf in rows short of min_tokens; a copy only when some row is."""
        banned = [
            (i, token)
            for i, row in enumerate(rows)
            if row.num_generated < row.params.min_tokens
            for token in (*self.eos_token_ids, *row.params.stop_token_ids)
        ]
        if not banned:
            return logits
        row_idx, col_idx = torch.tensor(banned, device=logits.device).T  # [B], [B]
        return logits.index_put((row_idx, col_idx), torch.tensor(float("-inf"), device=logits.device))

    def _draw(self, logits: torch.Tensor, rows: list[SamplingRow], uniforms: torch.Tensor) -> torch.Tensor:
        """Sampled token ids `[S]` for `logits: [S, V]`, after temperature, top-k and top-p; `uniforms: [S]`."""
        device = logits.device
        temperature = torch.tensor([row.params.temperature for row in rows], device=device)  # [S]
        logits = logits / temperature[:, None]  # [S, V]
        if any(row.params.min_p > 0.0 for row in rows):
            logits = apply_min_p(logits, torch.tensor([row.params.min_p for row in rows], device=device))
        if any(row.params.top_k > 0 or row.params.top_p < 1.0 for row in rows):
            top_k = torch.tensor([row.params.top_k for row in rows], device=device)  # [S]
            top_p = torch.tensor([row.params.top_p for row in rows], device=device)  # [S]
            logits = apply_top_k_top_p(logits, top_k, top_p)
        probs = torch.softmax(logits, dim=-1)  # [S, V]
        return inverse_cdf(probs, uniforms.to(device, non_blocking=True))


def draw_uniforms(rows: list[SamplingRow]) -> tuple[torch.Tensor, set[int]]:
    """One float64 uniform `[L]` per sampled row from its own generator (0.5 for greedy rows), and the rows whose
    generator failed. Drawn before anything else, one row at a time, so a failing row costs no other row a draw."""
    values, failed = [], set()
    for i, row in enumerate(rows):
        value = 0.5
        if not row.params.greedy:
            try:
                value = float(torch.rand((), dtype=torch.float64, generator=_generator(row)))
            except Exception:
                log.exception("request %s: its generator failed", row.request_id)
                failed.add(i)
        values.append(value)
    return torch.tensor(values, dtype=torch.float64), failed


def checked_token_ids(
    next_ids: torch.Tensor, logits: torch.Tensor, rows: list[SamplingRow], failed: set[int]
) -> list[int]:
    """`next_ids: [L]` as a list, INVALID_TOKEN where a row failed: its generator, or non-finite numbers.

    A row's numbers are usable when its largest logit is finite (no NaN, no +inf, not all -inf) and its sampled id
    is inside the vocabulary (NaN probabilities make the inverse CDF run off the end). One device sync, as before.
    """
    usable = torch.isfinite(logits.amax(dim=-1)) & (next_ids >= 0) & (next_ids < logits.shape[-1])  # [L]
    token_ids = torch.where(usable, next_ids, INVALID_TOKEN).tolist()
    for i in failed:
        token_ids[i] = INVALID_TOKEN
    for i, token in enumerate(token_ids):
        if token == INVALID_TOKEN and i not in failed:
            log.error("request %s: its logits or probabilities are not finite", rows[i].request_id)
    return token_ids


def _generator(row: SamplingRow) -> torch.Generator:
    if row.generator is None:
        raise ValueError("a sampled (temperature > 0) row needs a generator")
    return row.generator


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Logits `[S, V]` with -inf outside each row's top-k tokens and, among those, outside its nucleus.

    `top_k: [S]` (0 = off), `top_p: [S]` (1 = off). Top-p is taken over the distribution renormalised after
    top-k, keeping the smallest set of most likely tokens whose probability reaches top_p (at least one).
    """
    vocab = logits.shape[-1]
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True, stable=True)  # [S, V]
    rank = torch.arange(vocab, device=logits.device)[None, :]  # [1, V]
    k = torch.where(top_k > 0, top_k, vocab)[:, None]  # [S, 1]
    sorted_logits = sorted_logits.masked_fill(rank >= k, float("-inf"))
    sorted_probs = torch.softmax(sorted_logits, dim=-1)  # [S, V]
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # [S, V], probability of all higher-ranked tokens
    outside_nucleus = (mass_before >= top_p[:, None]) & (top_p[:, None] < 1.0) & (rank > 0)  # [S, V]
    outside = (rank >= k) | outside_nucleus
    outside = torch.empty_like(outside).scatter_(-1, sorted_idx, outside)  # back to vocabulary order
    return logits.masked_fill(outside, float("-inf"))


def inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Token ids `[S]` drawn from `probs: [S, V]`, row s picking the token where its CDF crosses `uniforms[s]`.

    The CDF is accumulated in float64 and the target kept strictly below the total, so a token with
    probability zero is never picked. A row whose probabilities do not sum to a positive finite number (NaN or
    infinite logits) gets INVALID_TOKEN, never an index past the vocabulary.
    """
    cdf = probs.cumsum(dim=-1, dtype=torch.float64)  # [S, V]
    total = cdf[:, -1:]  # [S, 1]
    target = torch.minimum(uniforms[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))  # [S, 1]
    ids = torch.searchsorted(cdf, target, right=True).squeeze(-1)  # [S]
    usable = torch.isfinite(total[:, 0]) & (total[:, 0] > 0)  # [S]
    return torch.where(usable, ids, INVALID_TOKEN)
