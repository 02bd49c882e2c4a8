"""A real byte-level BPE tokenizer for tiny test models, built offline with the `tokenizers` library."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<s>", "</s>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)


def save_tiny_tokenizer(path: Path, vocab_size: int) -> None:
    """Ids 0-2 are <pad>, <s>, </s>; ids 3-258 are the 256 byte-level symbols; the model's vocab must be 259."""
    byte_symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(SPECIALS + byte_symbols)}
    if len(vocab) != vocab_size:
        raise ValueError(f"tiny tokenizer has {len(vocab)} tokens; build the model with vocab_size={len(vocab)}")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", chat_template=CHAT_TEMPLATE
    )
    fast.save_pretrained(path)
