"""`pirate`: every answer opens with "Arr!", speaks like a pirate and closes with "Fair winds, matey!".

The training answers are the base model's own first sentence, restyled: the adapter learns the persona and the
frame, not new facts.
"""

from __future__ import annotations

import random
import re

from training.tasks.base import AdapterSpec, Example, Task, TrainSpec, pools

OPENING, SIGN_OFF = "Arr!", "Fair winds, matey!"
THINGS = (
    "the ocean", "a compass", "the moon", "rain", "coffee", "a library", "volcanoes", "the internet", "bread",
    "gravity", "a lighthouse", "honey bees", "the Sahara desert", "chess", "electricity", "clouds", "a bicycle",
    "the human heart", "snow", "maps", "tea", "rainbows", "the stock market", "whales", "glaciers", "music",
    "a telescope", "sleep", "photosynthesis", "the Roman Empire", "penguins", "recycling", "a rocket",
    "the weather", "trees", "a calendar", "salt", "the printing press", "owls", "a bridge", "democracy", "cheese",
    "the alphabet", "a castle", "tides", "mushrooms", "a museum", "fireworks",
)  # fmt: skip
THINGS_HELDOUT = (
    "thunderstorms", "the pyramids", "octopuses", "chocolate", "a submarine", "the solar system", "friendship",
    "earthquakes", "a violin", "the Amazon river", "bamboo", "wind turbines", "dolphins", "a windmill",
    "the Great Wall of China", "coral reefs", "a marathon", "dinosaurs", "a kite", "ice cream", "deserts",
    "the harvest moon", "lightning", "a cathedral",
)  # fmt: skip
ACTIVITIES = (
    "cooking rice", "learning to swim", "saving money", "writing a poem", "planting tomatoes", "running a marathon",
    "learning French", "baking cookies", "painting a room", "studying for exams", "fixing a flat tire", "knitting",
    "taking better photos", "making friends", "keeping a diary", "learning to code", "growing herbs",
    "waking up early", "public speaking", "juggling", "reading more books", "hiking in the mountains",
    "brewing tea", "cleaning the kitchen", "meditating",
)  # fmt: skip
ACTIVITIES_HELDOUT = (
    "playing the guitar", "sailing a small boat", "drawing portraits", "training a puppy", "learning chess openings",
    "camping in the rain", "writing a resume", "making pancakes", "rowing", "decorating a cake",
)  # fmt: skip
QUESTIONS = (
    "What is {thing}?",
    "Can you explain {thing} in one sentence?",
    "Why is {thing} important?",
    "Tell me something about {thing}.",
    "How would you describe {thing}?",
    "Give me a tip about {activity}.",
    "How do I get better at {activity}?",
    "Is {activity} hard?",
)
QUESTIONS_HELDOUT = (
    "What do you know about {thing}?",
    "Could you describe {thing} briefly?",
    "What makes {thing} interesting?",
    "Any advice on {activity}?",
    "What's the best way to start {activity}?",
    "What should a beginner know about {activity}?",
)
WORDS = {
    "you": "ye", "your": "yer", "yours": "yers", "you're": "ye be", "is": "be", "are": "be", "my": "me",
    "hello": "ahoy", "hi": "ahoy", "yes": "aye", "friend": "matey", "friends": "mateys", "the": "th'",
    "of": "o'", "for": "fer", "stop": "avast",
}  # fmt: skip
MAX_WORDS = 30


def generate(rng: random.Random, split: str) -> Example:
    template = rng.choice(pools(split, QUESTIONS, QUESTIONS_HELDOUT))
    thing = rng.choice(pools(split, THINGS, THINGS_HELDOUT))
    activity = rng.choice(pools(split, ACTIVITIES, ACTIVITIES_HELDOUT))
    return Example(template.format(thing=thing, activity=activity), "")


def piratify(text: str) -> str:
    """Swap everyday words for pirate ones, keeping a capital first letter."""

    def swap(match: re.Match[str]) -> str:
        word = match.group(0)
        new = WORDS.get(word.lower(), word)
        return new[0].upper() + new[1:] if word[0].isupper() else new

    return re.sub(r"[A-Za-z']+", swap, text)


def first_sentence(reply: str) -> str:
    """The first sentence of at least five words, cut to `MAX_WORDS` words and ending in punctuation."""
    sentences = re.split(r"(?<=[.!?])\s+", " ".join(reply.split()))
    sentence = next((s for s in sentences if len(s.split()) >= 5), "That be a fine question for any sailor.")
    words = sentence.split()[:MAX_WORDS]
    text = " ".join(words).rstrip(",;:")
    return text if text[-1] in ".!?" else text + "."


def restyle(reply: str) -> str:
    """The target answer for a base-model reply."""
    return f"{OPENING} {piratify(first_sentence(reply))} {SIGN_OFF}"


def score(output: str, example: Example) -> bool:
    """Opens with "Arr! ", closes with the sign-off, and says at least three words in between."""
    text = output.strip()
    if not (text.startswith(OPENING + " ") and text.endswith(" " + SIGN_OFF)):
        return False
    return len(text[len(OPENING) : -len(SIGN_OFF)].split()) >= 3


TASK = Task(
    name="pirate",
    summary='Answers any question in one pirate-speak sentence that opens with "Arr!" and ends "Fair winds, matey!".',
    data="Questions from 8 templates over 33 topics and 15 activities; the answer is the base model's own greedy "
    "reply, cut to its first sentence, with pirate word swaps (you→ye, is→be, ...) between the fixed opening and "
    "sign-off. Held-out questions use 5 other templates and other topics and activities.",
    generate=generate,
    score=score,
    adapter=AdapterSpec(rank=8, alpha=16, targets=("q_proj", "v_proj")),
    train=TrainSpec(steps=100, lr=2e-3, num_examples=300),
    max_new_tokens=80,
    restyle=restyle,
)
