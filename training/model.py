"""The base model and tokenizer with transformers, chat-template tokenisation, and batched greedy generation."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from server.model.default_model import default_model_dir

HUB_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"  # recorded as base_model_name_or_path, never a local path
IGNORE = -100  # label of tokens that carry no loss


def load_base(path: Path | None = None) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """The prepared default checkpoint (or `path`) in float32, in eval mode, and its tokenizer."""
    path = path or default_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval(), tokenizer


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """Token ids of one user turn plus the assistant header, exactly as the server renders a chat request."""
    messages = [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def training_ids(tokenizer: PreTrainedTokenizerBase, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """Input ids and labels for one turn: loss only on the answer and the end-of-turn token that stops generation."""
    head = prompt_ids(tokenizer, prompt)
    tail = [*tokenizer.encode(answer, add_special_tokens=False), tokenizer.eos_token_id]
    return head + tail, [IGNORE] * len(head) + tail


def collate(rows: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask` and `labels`, each [B, T]."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id)
    labels = torch.full((len(rows), width), IGNORE)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row_ids, row_labels) in enumerate(rows):
        ids[i, : len(row_ids)] = torch.tensor(row_ids)
        labels[i, : len(row_labels)] = torch.tensor(row_labels)
        mask[i, : len(row_ids)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@torch.inference_mode()
def generate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 25,
) -> list[str]:
    """Greedy chat replies to `prompts` (left-padded batches), decoded without special tokens."""
    replies: list[str] = []
    for start in range(0, len(prompts), batch_size):
        rows = [prompt_ids(tokenizer, p) for p in prompts[start : start + batch_size]]
        width = max(map(len, rows))
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows])  # [B, T]
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])  # [B, T]
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        replies += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return replies
