"""The three tokenizers, behind one small interface.

Every tokenizer has:
  vocab_size          int, unpadded (the model pads it to a multiple of its own choosing)
  eod                 id appended after each document (--append-eod) and seen by GPTDataset
  pad                 id megatron-core's GPTDataset treats as padding (masked out of the loss);
                      -1 when the vocabulary has no pad token: -1 never occurs in data
  bos                 id, or None when the vocabulary has none
  unique_identifiers  dict; megatron-core's dataset cache hashes it (json), so it names the files
  tokenize(text) -> list[int],  detokenize(ids) -> str
Construction errors are ValueErrors naming the command-line flag to fix.
"""

import json
import os
from abc import ABC, abstractmethod

NO_PAD = -1


class Tokenizer(ABC):
    """Attributes shared by all tokenizers; subclasses set them in __init__."""

    vocab_size: int
    eod: int
    pad: int = NO_PAD
    bos: int | None = None
    unique_identifiers: dict

    @abstractmethod
    def tokenize(self, text: str) -> list[int]: ...

    @abstractmethod
    def detokenize(self, ids) -> str: ...

    def _identify(self, **fields) -> dict:
        # Plain JSON-serializable values only: megatron-core json.dumps this into its cache key.
        return {"class": type(self).__name__, "vocab_size": self.vocab_size, **fields}


class NullTokenizer(Tokenizer):
    """Text is whitespace-separated integer ids (benchmarks, debugging, pre-tokenized data).

    Matches megatron-core's NullTokenizer: --vocab-size N gives the ordinary ids 0..N-1 plus the
    end-of-document id N, so vocab_size = N + 1 and eod = vocab_size - 1. No pad, no bos.
    """

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size + 1
        self.eod = vocab_size
        self.unique_identifiers = self._identify()

    def tokenize(self, text: str) -> list[int]:
        ids = [int(word) for word in text.split()]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"NullTokenizer: ids {bad[:5]} outside [0, {self.vocab_size})")
        return ids

    def detokenize(self, ids) -> str:
        return " ".join(str(int(i)) for i in ids)


class GPT2BPETokenizer(Tokenizer):
    """GPT-2's byte-level BPE from its vocab.json (encoder.json) and merges.txt (vocab.bpe).

    Uses the `tokenizers` library fully offline. "<|endoftext|>" inside the text is encoded as
    ordinary text, as Megatron-LM's GPT-2 tokenizer and tiktoken's encode_ordinary do; only the
    document separator added by --append-eod is the real end-of-text id.
    """

    EOD_TOKEN = "<|endoftext|>"

    def __init__(self, vocab_file: str, merge_file: str):
        from tokenizers import ByteLevelBPETokenizer

        vocab = _read_gpt2_vocab(vocab_file)
        if self.EOD_TOKEN not in vocab:
            raise ValueError(
                f"--vocab-file {vocab_file} has no {self.EOD_TOKEN!r} entry: "
                "give GPT-2's vocab.json / encoder.json"
            )
        _check_gpt2_merges(merge_file)
        try:
            self._bpe = ByteLevelBPETokenizer(vocab_file, merge_file)
        except Exception as err:  # the Rust library raises its own exception type
            raise ValueError(
                f"--vocab-file {vocab_file} and --merge-file {merge_file} do not load as one "
                f"GPT-2 BPE tokenizer (are they from the same model?): {err}"
            ) from err
        self.vocab_size = self._bpe.get_vocab_size()
        self.eod = vocab[self.EOD_TOKEN]
        self.unique_identifiers = self._identify(
            vocab_file=os.path.abspath(vocab_file), merge_file=os.path.abspath(merge_file)
        )

    def tokenize(self, text: str) -> list[int]:
        return self._bpe.encode(text).ids

    def detokenize(self, ids) -> str:
        return self._bpe.decode([int(i) for i in ids])


def _read_gpt2_vocab(vocab_file: str) -> dict:
    try:
        with open(vocab_file, encoding="utf-8") as f:
            vocab = json.load(f)
    except UnicodeDecodeError as err:  # binary: most likely a sentencepiece model
        raise ValueError(f"--vocab-file {vocab_file} is not a JSON vocabulary (a binary file: "
                         f"{err.reason} at byte {err.start}); for a sentencepiece model use "
                         f"--tokenizer-type SentencePieceTokenizer --tokenizer-model "
                         f"{vocab_file}") from None
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"--vocab-file {vocab_file} is not a JSON vocabulary: {err}") from err
    if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
        raise ValueError(f"--vocab-file {vocab_file} must map tokens to integer ids")
    return vocab


def _check_gpt2_merges(merge_file: str) -> None:
    # Each merge rule is two space-separated symbols; an optional "#version" header comes first.
    with open(merge_file, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if lineno == 1 and line.startswith("#version"):
                continue
            if line.strip() and len(line.split()) != 2:
                raise ValueError(
                    f"--merge-file {merge_file} line {lineno} is not a BPE merge rule "
                    f"('first second'): {line.strip()[:60]!r}; give GPT-2's merges.txt / vocab.bpe"
                )


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model, loaded through megatron-core's tokenizer library (offline).

    sentencepiece has no end-of-document token: eod is the model's end-of-sentence id (</s>),
    as megatron-core does. pad is the model's pad id (-1 unless trained with one).
    """

    def __init__(self, model_file: str):
        # Imported here: megatron.core takes seconds to import and the other tokenizers skip it.
        from megatron.core.tokenizers import MegatronTokenizer

        model_file = os.path.abspath(model_file)
        try:
            self._sp = MegatronTokenizer.from_pretrained(
                tokenizer_path=model_file, metadata_path={"library": "sentencepiece"}
            )
        except (OSError, RuntimeError) as err:
            raise ValueError(
                f"--tokenizer-model {model_file} is not a sentencepiece model: {err}"
            ) from err
        self.vocab_size = self._sp.vocab_size
        self.eod = self._sp.eos
        if self.eod < 0:
            raise ValueError(
                f"--tokenizer-model {model_file} has no end-of-sentence piece (eos_id=-1), "
                "which is needed as the end-of-document id: retrain it with eos_id >= 0"
            )
        self.pad = self._sp.pad
        self.bos = self._sp.bos if self._sp.bos >= 0 else None
        self.unique_identifiers = self._identify(tokenizer_model=model_file)

    def tokenize(self, text: str) -> list[int]:
        return self._sp.tokenize(text)

    def detokenize(self, ids) -> str:
        return self._sp.detokenize([int(i) for i in ids])
