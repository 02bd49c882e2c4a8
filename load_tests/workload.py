"""What a load run sends: when each request leaves, which model it names, and its prompt and output lengths.

Everything is drawn from one seeded generator, so a run is reproducible. Arrivals follow a gamma process (shape 1
is Poisson, smaller is burstier, as vLLM's `--burstiness`); adapter popularity is uniform, Zipf(s) over the list
order, or S-LoRA's power(α) (index = ⌊n·U^(1/α)⌋: α < 1 favours the first models, α = 1 is uniform).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Literal

Popularity = Literal["uniform", "zipf", "power"]


@dataclass(frozen=True)
class LengthRange:
    """An inclusive range of integers drawn uniformly."""

    low: int
    high: int

    def __post_init__(self) -> None:
        if not 0 < self.low <= self.high:
            raise ValueError(f"need 0 < low <= high, got {self.low}:{self.high}")

    @classmethod
    def parse(cls, text: str) -> LengthRange:
        """`"16:128"` or a single `"32"`."""
        low, _, high = text.partition(":")
        return cls(int(low), int(high or low))

    def draw(self, rng: random.Random) -> int:
        return rng.randint(self.low, self.high)


@dataclass(frozen=True)
class Workload:
    """The shape of a run; `rate` is requests per second (inf: all at t = 0)."""

    num_requests: int = 100
    rate: float = math.inf
    burstiness: float = 1.0  # gamma shape of the inter-arrival times; 1 = Poisson
    popularity: Popularity = "uniform"
    skew: float = 1.0  # Zipf's s or power's α
    prompt_len: LengthRange = LengthRange(32, 256)
    output_len: LengthRange = LengthRange(16, 128)
    token_ids: LengthRange = LengthRange(100, 250)  # prompt token ids are drawn from here: keep it in the vocabulary
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_requests <= 0 or self.rate <= 0 or self.burstiness <= 0 or self.skew <= 0:
            raise ValueError("num_requests, rate, burstiness and skew must be positive")


@dataclass(frozen=True)
class PlannedRequest:
    """One request of the run, before it is sent."""

    index: int
    send_at: float  # seconds after the start of the run
    model: str
    prompt: list[int]  # token ids, so that the prompt length is exact whatever the tokenizer
    max_tokens: int


def arrival_times(rng: random.Random, n: int, rate: float, burstiness: float) -> list[float]:
    """Send times of `n` requests: gamma inter-arrivals with mean 1/rate; all zero for an infinite rate."""
    if math.isinf(rate):
        return [0.0] * n
    scale = 1.0 / (rate * burstiness)
    times, t = [], 0.0
    for _ in range(n):
        t += rng.gammavariate(burstiness, scale)
        times.append(t)
    return times


def pick_models(rng: random.Random, models: list[str], n: int, popularity: Popularity, skew: float) -> list[str]:
    """The model of each of `n` requests under the popularity law; earlier models are the popular ones."""
    if not models:
        raise ValueError("no models to send requests to")
    if popularity == "uniform":
        return [rng.choice(models) for _ in range(n)]
    if popularity == "zipf":
        weights = [1.0 / (rank**skew) for rank in range(1, len(models) + 1)]
        return rng.choices(models, weights=weights, k=n)
    return [models[min(int(len(models) * rng.random() ** (1.0 / skew)), len(models) - 1)] for _ in range(n)]


def plan(workload: Workload, models: list[str]) -> list[PlannedRequest]:
    """Every request of the run, in send order."""
    rng = random.Random(workload.seed)
    n = workload.num_requests
    times = arrival_times(rng, n, workload.rate, workload.burstiness)
    chosen = pick_models(rng, models, n, workload.popularity, workload.skew)
    requests = []
    for i, (send_at, model) in enumerate(zip(times, chosen, strict=True)):
        prompt = [workload.token_ids.draw(rng) for _ in range(workload.prompt_len.draw(rng))]
        requests.append(PlannedRequest(i, send_at, model, prompt, workload.output_len.draw(rng)))
    return requests
