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


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, help="JSONL file, one JSON object per line")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="keys whose text is used")
    p.add_argument("--model-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    p.add_argument("--character-coverage", type=float, default=1.0,
                   help="share of characters the vocabulary covers; the rest fall back to bytes")
    p.add_argument("--byte-fallback", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--seed", type=int, default=1234)
    return p.parse_args(argv)


def iter_lines(path: str, keys: list[str]):
    """Yield each non-empty line of each document's text.

    sentencepiece trains on "sentences" and skips any longer than 4192 bytes, so documents are
    fed line by line; newlines come back as the user-defined "\\n" piece.
    """
    with open(path, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            doc = json.loads(raw)
            for key in keys:
                if key not in doc:
                    raise ValueError(f"--input {path} line {lineno}: no key {key!r} (--json-keys)")
                yield from (line for line in doc[key].split("\n") if line.strip())


def train(args: argparse.Namespace) -> str:
    import sentencepiece as spm

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
    except RuntimeError as err:  # e.g. "Vocabulary size too high (N). Please set it to <= M"
        raise ValueError(f"sentencepiece training failed (check --vocab-size): {err}") from err
    return args.model_prefix + ".model"


def main(argv=None) -> str:
    model = train(parse_args(argv))
    print(f"wrote {model}")
    return model


if __name__ == "__main__":
    main()
