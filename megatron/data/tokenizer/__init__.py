"""build_tokenizer: Megatron's --tokenizer-type names -> one of our tokenizers
(see tokenizer.py)."""

import os

from megatron.data.tokenizer.tokenizer import (
    GPT2BPETokenizer,
    NullTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
)

TOKENIZER_TYPES = ("GPT2BPETokenizer", "SentencePieceTokenizer", "NullTokenizer")

__all__ = ["build_tokenizer", "TOKENIZER_TYPES", "Tokenizer"]


def build_tokenizer(
    tokenizer_type: str,
    *,
    tokenizer_model: str | None = None,
    vocab_file: str | None = None,
    merge_file: str | None = None,
    vocab_size: int | None = None,
) -> Tokenizer:
    """Flags a type does not use are ignored, as in Megatron-LM."""
    if tokenizer_type == "GPT2BPETokenizer":
        return GPT2BPETokenizer(
            _existing_file(vocab_file, "--vocab-file", "GPT-2's vocab.json / encoder.json"),
            _existing_file(merge_file, "--merge-file", "GPT-2's merges.txt / vocab.bpe"),
        )
    if tokenizer_type == "SentencePieceTokenizer":
        return SentencePieceTokenizer(
            _existing_file(
                tokenizer_model,
                "--tokenizer-model",
                "a sentencepiece .model file (tools/train_tokenizer.py makes one)",
            )
        )
    if tokenizer_type == "NullTokenizer":
        # bool is an int subclass; True as a vocabulary size is always a mistake
        if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 1:
            raise ValueError(
                f"--vocab-size must be a positive integer for NullTokenizer, got {vocab_size!r}"
            )
        return NullTokenizer(vocab_size)
    raise ValueError(
        f"--tokenizer-type {tokenizer_type!r} is not supported: "
        f"use one of {', '.join(TOKENIZER_TYPES)}"
    )


def _existing_file(path: str | None, flag: str, what: str) -> str:
    if not path:
        raise ValueError(f"{flag} is required: give the path of {what}")
    if not os.path.isfile(path):
        raise ValueError(f"{flag} {path}: file not found; give the path of {what}")
    return path
