"""A word-level tokenizer for random-weight test models."""

from __future__ import annotations


def sized_word_tokenizer(size: int):
    """A word-level tokenizer of exactly `size` tokens ("w<i>"), so that every id it makes is a row of the model's
    embedding (a tokenizer larger than the model is refused per request; see test_rolling_batch)."""
    import tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {f"w{i}": i for i in range(size - 2)} | {"[UNK]": size - 2, "</s>": size - 1}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="</s>")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return tokenizer
