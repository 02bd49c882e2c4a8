"""What a task is: a synthetic data generator, a deterministic scorer and the adapter and training recipe."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class Example:
    """One chat turn: the user's prompt and the reference answer (empty where the scorer needs none)."""

    prompt: str
    answer: str


@dataclass(frozen=True)
class AdapterSpec:
    """The PEFT LoRA config fields that differ between tasks."""

    rank: int
    alpha: int
    targets: tuple[str, ...]
    use_dora: bool = False
    use_rslora: bool = False


@dataclass(frozen=True)
class TrainSpec:
    """Optimisation recipe: AdamW, linear warmup then linear decay."""

    steps: int = 150
    batch_size: int = 8
    lr: float = 2e-3
    warmup: int = 10
    num_examples: int = 600
    seed: int = 0


@dataclass(frozen=True)
class Task:
    """A checkable behaviour an adapter is trained to show."""

    name: str
    summary: str
    data: str  # how the synthetic data is made, for the adapter README
    generate: Callable[[random.Random, str], Example]  # (rng, split) -> one example
    score: Callable[[str, Example], bool]  # (model output, example) -> success
    adapter: AdapterSpec
    train: TrainSpec = field(default_factory=TrainSpec)
    max_new_tokens: int = 48
    # Tasks whose answers wrap the base model's own reply: maps that reply to the target answer.
    restyle: Callable[[str], str] | None = None

    def examples(self, split: str, n: int, seed: int) -> list[Example]:
        """`n` distinct-prompt examples of `split`, the same for the same seed."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
        rng = random.Random(f"{self.name}/{split}/{seed}")
        seen: dict[str, Example] = {}
        for _ in range(n * 50):
            example = self.generate(rng, split)
            seen.setdefault(example.prompt, example)
            if len(seen) == n:
                return list(seen.values())
        raise ValueError(f"{self.name}: the {split} pools hold fewer than {n} distinct prompts")


def pools(split: str, train: Sequence[str], heldout: Sequence[str]) -> Sequence[str]:
    """The word pool of a split: training and held-out prompts never share these entities or templates."""
    return train if split == "train" else heldout
