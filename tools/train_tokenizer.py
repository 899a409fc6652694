"""Train a sentencepiece model (BPE or unigram) on a JSONL corpus, offline and reproducibly.

    python tools/train_tokenizer.py --input data/shakespeare.jsonl --model-prefix data/spm \
        --vocab-size 8000 --model-type bpe

Writes {model-prefix}.model and {model-prefix}.vocab; use the .model with
--tokenizer-type SentencePieceTokenizer --tokenizer-model {model-prefix}.model.

Text round-trips exactly: no normalization, whitespace kept, "\\n" is a piece of its own and
unseen characters fall back to bytes (--no-byte-fallback turns that off). Same input and flags
give the same model bytes: one trainer thread, a fixed seed, and every line used (no sampling).
"""

import argparse
import json
import os
import re
import sys

# Runnable as `python tools/train_tokenizer.py` from anywhere: tools/_cli.py is found from the root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools._cli import Parser, check_input_file, output_directory, run  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, help="JSONL file, one JSON object per line")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="keys whose text is used")
    p.add_argument("--model-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    p.add_argument("--character-coverage", type=float, default=1.0,
                   help="share of characters the vocabulary covers; the rest fall back to bytes")
    p.add_argument("--byte-fallback", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)
    if args.vocab_size < 1:
        p.error(f"--vocab-size must be >= 1 (got {args.vocab_size})")
    return args


def iter_lines(path: str, keys: list[str]):
    """Yield each non-empty line of each document's text.

    sentencepiece trains on "sentences" and skips any longer than 4192 bytes, so documents are
    fed line by line; newlines come back as the user-defined "\\n" piece.
    """
    with open(path, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                doc = json.loads(raw)
            except json.JSONDecodeError as err:
                raise ValueError(f"--input {path} line {lineno} is not JSON: {err}") from None
            for key in keys:
                if not isinstance(doc, dict) or key not in doc:
                    raise ValueError(f"--input {path} line {lineno}: no key {key!r} (--json-keys)")
                if not isinstance(doc[key], str):
                    raise ValueError(f"--input {path} line {lineno}: {key!r} is not a string "
                                     "(--json-keys)")
                yield from (line for line in doc[key].split("\n") if line.strip())


def train(args: argparse.Namespace) -> str:
    import sentencepiece as spm

    check_input_file(args.input, "--input")
    output_directory(args.model_prefix, "--model-prefix")
    # Seeds sentencepiece's global generator (used by unigram's EM and any sampling).
    spm.set_random_generator_seed(args.seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter_lines(args.input, args.json_keys),
            model_prefix=args.model_prefix,
            vocab_size=args.vocab_size,
            model_type=args.model_type,
            character_coverage=args.character_coverage,
            byte_fallback=args.byte_fallback,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            user_defined_symbols=["\n"],
            input_sentence_size=0,
            num_threads=1,
            minloglevel=2,
        )
    except RuntimeError as err:
        raise ValueError(_explain(str(err), args)) from None
    return args.model_prefix + ".model"


def _explain(message: str, args) -> str:
    """sentencepiece's C++ check failures, in terms of our flags (it names its own, vocab_size)."""
    high = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)",
                     message)
    if high:
        return (f"--vocab-size {high[1]} is too high for this corpus: sentencepiece can make at "
                f"most {high[2]} pieces of it; use --vocab-size {high[2]} or less, or a larger "
                "--input")
    low = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", message)
    if low:
        return (f"--vocab-size {low[1]} is below the {low[2]} pieces this corpus needs (its "
                f"distinct characters, the special pieces and, with byte fallback, 256 byte "
                f"pieces); use --vocab-size {low[2]} or more, or a lower --character-coverage")
    if "sentences_.empty()" in message:
        return f"--input {args.input} has no text under --json-keys {' '.join(args.json_keys)}"
    detail = message.split("] ", 1)[-1].strip()
    return f"sentencepiece training failed: {detail}"


def main(argv=None) -> str:
    model = train(parse_args(argv))
    print(f"wrote {model}")
    return model


if __name__ == "__main__":
    run(main)
