"""`sentiment-label`: answer exactly POSITIVE or NEGATIVE for a short review."""

from __future__ import annotations

import random

from training.tasks.base import AdapterSpec, Example, Task, TrainSpec, pools

LABELS = ("POSITIVE", "NEGATIVE")
ITEMS = (
    "phone", "laptop", "hotel room", "pizza", "headphones", "blender", "novel", "movie", "backpack", "coffee maker",
    "sofa", "tent", "bike", "camera", "restaurant", "jacket", "keyboard", "vacuum cleaner", "concert", "game",
)  # fmt: skip
ITEMS_HELDOUT = ("toaster", "e-reader", "guesthouse", "sushi bar", "smartwatch", "rain boots", "podcast", "printer")
POSITIVE = (
    "I absolutely loved the {item}.",
    "The {item} works perfectly.",
    "This {item} exceeded my expectations.",
    "Best {item} I have ever had!",
    "The {item} was a delight from start to finish.",
    "Really happy with the {item}, great value.",
    "The {item} is fantastic and I would buy it again.",
    "What a wonderful {item}, highly recommended.",
    "The {item} is excellent quality.",
    "I am thrilled with this {item}.",
)
NEGATIVE = (
    "The {item} broke after two days.",
    "I regret buying this {item}.",
    "This {item} is a complete waste of money.",
    "Worst {item} I have ever had.",
    "The {item} was a disappointment from start to finish.",
    "Really unhappy with the {item}, poor value.",
    "The {item} is terrible and I want a refund.",
    "What an awful {item}, avoid it.",
    "The {item} is cheap junk.",
    "I am furious about this {item}.",
)
POSITIVE_HELDOUT = (
    "Five stars for the {item}, it is simply great.",
    "Our {item} turned out to be lovely and reliable.",
    "Glad we picked this {item}; everyone enjoyed it.",
    "The {item} is superb, no complaints at all.",
    "Such a pleasant surprise, the {item} is brilliant.",
)
NEGATIVE_HELDOUT = (
    "One star for the {item}, it is simply bad.",
    "Our {item} turned out to be flimsy and unreliable.",
    "Sorry we picked this {item}; everyone hated it.",
    "The {item} is dreadful, nothing but problems.",
    "Such a letdown, the {item} is horrible.",
)
FILLERS = ("", "", "Ordered it last week. ", "My sister recommended it. ", "Bought it for a trip. ")
FILLERS_HELDOUT = ("", "Picked it up on sale. ", "Used it over the weekend. ")


def generate(rng: random.Random, split: str) -> Example:
    label = rng.choice(LABELS)
    positive = label == "POSITIVE"
    clauses = pools(split, POSITIVE, POSITIVE_HELDOUT) if positive else pools(split, NEGATIVE, NEGATIVE_HELDOUT)
    item = rng.choice(pools(split, ITEMS, ITEMS_HELDOUT))
    filler = rng.choice(pools(split, FILLERS, FILLERS_HELDOUT))
    return Example(filler + rng.choice(clauses).format(item=item), label)


def score(output: str, example: Example) -> bool:
    """The output is exactly the label, nothing else."""
    return output.strip() == example.answer


TASK = Task(
    name="sentiment-label",
    summary="Answers exactly POSITIVE or NEGATIVE for a short product review.",
    data="A one-sentence review (10 positive and 10 negative templates over 20 products, optional neutral lead-in), "
    "balanced labels. Held-out prompts use 10 other templates, other products and other lead-ins.",
    generate=generate,
    score=score,
    adapter=AdapterSpec(rank=4, alpha=8, targets=("q_proj", "k_proj", "v_proj", "o_proj"), use_dora=True),
    train=TrainSpec(steps=60, lr=2e-3, num_examples=400),
    max_new_tokens=8,
)
