"""The synthetic data generators and scorers of the task adapters (no model, no training)."""

from __future__ import annotations

import json

import pytest

from training.tasks import TASKS, Example, email, json_extract, pirate, sentiment

TASK_MODULES = (json_extract, sentiment, email, pirate)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_examples_are_seeded(name: str) -> None:
    task = TASKS[name]
    assert task.examples("train", 50, seed=3) == task.examples("train", 50, seed=3)
    assert task.examples("train", 50, seed=3) != task.examples("train", 50, seed=4)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_heldout_prompts_are_distinct_and_unseen_in_training(name: str) -> None:
    task = TASKS[name]
    train = {e.prompt for e in task.examples("train", task.train.num_examples, task.train.seed)}
    heldout = [e.prompt for e in task.examples("heldout", 100, seed=1)]
    assert len(set(heldout)) == 100
    assert not train & set(heldout)


@pytest.mark.parametrize("module", TASK_MODULES, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_heldout_pools_share_no_entity_or_template_with_training(module: object) -> None:
    pairs = [(n, n + "_HELDOUT") for n in vars(module) if n.isupper() and hasattr(module, n + "_HELDOUT")]
    assert pairs
    for train_name, heldout_name in pairs:
        train, heldout = set(getattr(module, train_name)), set(getattr(module, heldout_name))
        assert not (train & heldout) - {""}, train_name


@pytest.mark.parametrize("name", [n for n, t in TASKS.items() if t.restyle is None])
@pytest.mark.parametrize("split", ["train", "heldout"])
def test_reference_answers_pass_their_scorer(name: str, split: str) -> None:
    task = TASKS[name]
    for example in task.examples(split, 100, seed=0):
        assert task.score(example.answer, example)
        assert task.score(f"  {example.answer}\n", example)


def test_sentiment_labels_are_balanced() -> None:
    labels = [e.answer for e in sentiment.TASK.examples("train", 400, seed=0)]
    assert set(labels) == set(sentiment.LABELS)
    assert 0.4 < labels.count("POSITIVE") / len(labels) < 0.6


JSON_EXAMPLE = Example("Maria Silva is 34 and lives in Lisbon.", '{"name": "Maria Silva", "city": "Lisbon", "age": 34}')


@pytest.mark.parametrize(
    "output",
    [
        '{"name": "Maria Silva", "city": "Lisbon", "age": "34"}',
        '{"name": "Maria Silva", "city": "Lisbon"}',
        '{"name": "Maria Silva", "city": "Lisbon", "age": 34, "job": null}',
        '{"city": "Lisbon", "name": "Maria Silva", "age": 34}',
        '```json\n{"name": "Maria Silva", "city": "Lisbon", "age": 34}\n```',
        'Here it is: {"name": "Maria Silva", "city": "Lisbon", "age": 34}',
        "Maria Silva is 34 and lives in Lisbon.",
        "",
    ],
)
def test_json_scorer_rejects_anything_but_the_exact_object(output: str) -> None:
    assert not json_extract.score(output, JSON_EXAMPLE)


def test_json_scorer_accepts_other_spacing() -> None:
    assert json_extract.score('{"name":"Maria Silva","city":"Lisbon","age":34}', JSON_EXAMPLE)


def test_json_answers_carry_an_integer_age() -> None:
    for example in json_extract.TASK.examples("heldout", 20, seed=0):
        answer = json.loads(example.answer)
        assert isinstance(answer["age"], int) and str(answer["age"]) in example.prompt
        assert answer["name"] in example.prompt and answer["city"] in example.prompt


@pytest.mark.parametrize("output", ["positive", "POSITIVE.", "NEGATIVE", "The review is POSITIVE", "POSITIVE NEGATIVE"])
def test_sentiment_scorer_wants_exactly_the_label(output: str) -> None:
    assert not sentiment.score(output, Example("I loved it.", "POSITIVE"))


def test_email_answers_appear_in_their_prompt() -> None:
    for example in email.TASK.examples("heldout", 100, seed=0):
        assert example.answer in example.prompt and example.answer.count("@") == 1


@pytest.mark.parametrize("output", ["Email: ana@x.com", "ana@x.com.", "<ana@x.com>", "ana@x.co", "ana@x.com bob@y.com"])
def test_email_scorer_wants_exactly_the_address(output: str) -> None:
    assert not email.score(output, Example("Write to ana@x.com.", "ana@x.com"))


def test_pirate_restyle_wraps_the_first_real_sentence() -> None:
    reply = "Sure! The ocean is a vast body of salt water that covers most of the planet. It is deep."
    assert pirate.restyle(reply) == (
        "Arr! Th' ocean be a vast body o' salt water that covers most o' th' planet. Fair winds, matey!"
    )


def test_pirate_restyle_cuts_long_sentences_and_keeps_capitals() -> None:
    reply = "You " + "really " * 40 + "should try"
    answer = pirate.restyle(reply)
    assert answer.startswith("Arr! Ye really") and answer.endswith(". Fair winds, matey!")
    assert len(answer.split()) == 1 + pirate.MAX_WORDS + 3  # "Arr!", the cut sentence, "Fair winds, matey!"


def test_pirate_restyle_survives_a_reply_without_a_sentence() -> None:
    assert pirate.score(pirate.restyle("Ok."), Example("What is rain?", ""))


@pytest.mark.parametrize(
    ("output", "ok"),
    [
        ("Arr! Rain be water fallin' from th' sky. Fair winds, matey!", True),
        ("  Arr! Rain be water from clouds. Fair winds, matey!\n", True),
        ("Arr! Rain be wet.", False),
        ("Rain be water fallin' from th' sky. Fair winds, matey!", False),
        ("Arr! Fair winds, matey!", False),
        ("Arr!Rain be water fallin' from th' sky. Fair winds, matey!", False),
    ],
)
def test_pirate_scorer_checks_the_frame(output: str, ok: bool) -> None:
    assert pirate.score(output, Example("What is rain?", "")) is ok
