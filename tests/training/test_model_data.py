"""Chat-template tokenisation and batching for training, on a tiny offline tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from tests.tokenizer import save_tiny_tokenizer
from training.model import IGNORE, collate, prompt_ids, training_ids


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerBase:
    path: Path = tmp_path_factory.mktemp("tok")
    save_tiny_tokenizer(path, 259)
    return AutoTokenizer.from_pretrained(path)


def test_loss_falls_on_the_answer_and_end_of_turn_only(tokenizer: PreTrainedTokenizerBase) -> None:
    ids, labels = training_ids(tokenizer, "hi", "OK")
    head = prompt_ids(tokenizer, "hi")
    assert ids[: len(head)] == head and len(ids) == len(labels)
    assert labels[: len(head)] == [IGNORE] * len(head)
    assert tokenizer.decode(labels[len(head) : -1]) == "OK" and labels[-1] == tokenizer.eos_token_id
    assert labels[len(head) :] == ids[len(head) :]


def test_prompt_matches_the_servers_rendering(tokenizer: PreTrainedTokenizerBase) -> None:
    messages = [{"role": "user", "content": "hi"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt_ids(tokenizer, "hi") == tokenizer.encode(text, add_special_tokens=False)


def test_collate_right_pads(tokenizer: PreTrainedTokenizerBase) -> None:
    rows = [training_ids(tokenizer, "hi", "OK"), training_ids(tokenizer, "a longer prompt", "fine")]
    batch = collate(rows, pad_id=0)
    width = max(len(r[0]) for r in rows)
    assert all(t.shape == (2, width) for t in batch.values())
    short = len(rows[0][0])
    assert batch["attention_mask"][0].tolist() == [1] * short + [0] * (width - short)
    assert (batch["labels"][0, short:] == IGNORE).all() and (batch["input_ids"][0, short:] == 0).all()
    assert torch.equal(batch["input_ids"][1], torch.tensor(rows[1][0]))
