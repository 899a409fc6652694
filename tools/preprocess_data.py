"""Tokenize a JSONL corpus into Megatron's .bin/.idx files (Megatron-LM's interface and format).

    python tools/preprocess_data.py --input data/shakespeare.jsonl \
        --output-prefix data/shakespeare \
        --tokenizer-type GPT2BPETokenizer --vocab-file vocab.json --merge-file merges.txt \
        --append-eod --workers 2

writes {output-prefix}_{key}_document.bin/.idx for each --json-keys key, through megatron-core's
IndexedDatasetBuilder, so the files are byte-compatible with Megatron-LM's. Each JSON line is
one document (one sequence, the eod id appended with --append-eod). Files are written under a
temporary name and renamed only once every key is complete: an error never leaves a
half-written pair under the final name.
"""

import argparse
import functools
import json
import multiprocessing
import os
import sys
import time
import warnings

# megatron-core warns at import that Transformer Engine / Apex are absent; we do not use them.
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")

# Runnable as `python tools/preprocess_data.py` from anywhere: the repo root holds
# megatron/training.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder  # noqa: E402
from megatron.data.tokenizer import TOKENIZER_TYPES, build_tokenizer  # noqa: E402
from tools._cli import Parser, check_input_file, output_directory, run  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(description=__doc__.split("\n\n")[0])
    g = p.add_argument_group("input")
    g.add_argument("--input", required=True, help="JSONL file, one JSON object per line")
    g.add_argument("--json-keys", nargs="+", default=["text"], help="keys to tokenize")
    g.add_argument("--split-sentences", action="store_true",
                   help="not supported: needs nltk's punkt data, which cannot be fetched offline")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    g.add_argument("--tokenizer-model", help="sentencepiece .model (SentencePieceTokenizer)")
    g.add_argument("--vocab-file", help="GPT-2 vocab.json / encoder.json (GPT2BPETokenizer)")
    g.add_argument("--merge-file", help="GPT-2 merges.txt / vocab.bpe (GPT2BPETokenizer)")
    g.add_argument("--vocab-size", type=int, help="ordinary ids (NullTokenizer)")
    g.add_argument("--append-eod", action="store_true", help="end each document with eod")
    g = p.add_argument_group("output")
    g.add_argument("--output-prefix", required=True, help="writes PREFIX_{key}_document.bin/.idx")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    g.add_argument("--log-interval", type=int, default=100, help="documents between reports")
    args = p.parse_args(argv)
    if args.split_sentences:
        p.error("--split-sentences is not supported (it needs nltk and its punkt data, which "
                "cannot be fetched offline); drop the flag to write one sequence per document")
    if args.workers < 1:
        p.error("--workers must be >= 1")
    return args


def _tokenizer_kwargs(args) -> dict:
    return dict(tokenizer_model=args.tokenizer_model, vocab_file=args.vocab_file,
                merge_file=args.merge_file, vocab_size=args.vocab_size)


_tokenizer = None  # one per process, built by _init_tokenizer (the pool's initializer)


def _init_tokenizer(tokenizer_type: str, kwargs: dict) -> None:
    global _tokenizer
    _tokenizer = build_tokenizer(tokenizer_type, **kwargs)


def _encode(numbered_line, keys: list[str], append_eod: bool):
    """(line number, raw line) -> ({key: token ids}, bytes read)."""
    lineno, line = numbered_line
    try:
        doc = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"--input line {lineno} is not JSON: {err}") from None
    ids = {}
    for key in keys:
        if not isinstance(doc, dict) or not isinstance(doc.get(key), str):
            raise ValueError(f"--input line {lineno} has no text under key {key!r} (--json-keys)")
        try:
            ids[key] = _tokenizer.tokenize(doc[key])
        except ValueError as err:  # e.g. NullTokenizer: an id outside the vocabulary
            raise ValueError(f"--input line {lineno}: {err}") from None
        if append_eod and ids[key]:  # Megatron-LM leaves an empty document empty
            ids[key].append(_tokenizer.eod)
    return ids, len(line.encode("utf-8"))


def _numbered_lines(path: str):
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                yield lineno, line


def _encoded_docs(args):
    """Encoded documents in input order, from a worker pool when --workers > 1."""
    lines = _numbered_lines(args.input)
    init_args = (args.tokenizer_type, _tokenizer_kwargs(args))
    encode = functools.partial(_encode, keys=args.json_keys, append_eod=args.append_eod)
    if args.workers == 1:
        _init_tokenizer(*init_args)
        yield from map(encode, lines)
        return
    with multiprocessing.Pool(args.workers, _init_tokenizer, init_args) as pool:
        yield from pool.imap(encode, lines, chunksize=32)  # imap keeps the input order


def _write(args, prefixes: dict, vocab_size: int) -> tuple[int, dict]:
    """Tokenize everything into prefix.bin/.idx per key; returns (documents, {key: tokens})."""
    dtype = DType.optimal_dtype(vocab_size)  # uint16 below 65500 ids, as Megatron-LM does
    builders = {key: IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
                for key, prefix in prefixes.items()}
    docs, nbytes, tokens = 0, 0, dict.fromkeys(prefixes, 0)
    start = time.time()
    try:
        for ids, size in _encoded_docs(args):
            for key, doc in ids.items():
                # an empty text is an empty document (no sequence), as in Megatron-LM
                builders[key].add_document(doc, [len(doc)] if doc else [])
                tokens[key] += len(doc)
            docs, nbytes = docs + 1, nbytes + size
            if docs % args.log_interval == 0:
                elapsed = max(time.time() - start, 1e-9)
                print(f"processed {docs} documents ({docs / elapsed:.1f} docs/s, "
                      f"{nbytes / elapsed / 2**20:.2f} MB/s)", file=sys.stderr)
    except BaseException:
        for builder in builders.values():
            builder.data_file.close()
        raise
    for key, prefix in prefixes.items():
        builders[key].finalize(prefix + ".idx")
    return docs, tokens


def main(argv=None) -> dict:
    """Returns {"prefixes": {key: final prefix}, "documents": n, "tokens": {key: n}}."""
    args = parse_args(argv)
    check_input_file(args.input, "--input")
    for name, path in _tokenizer_kwargs(args).items():
        if isinstance(path, str) and os.path.isdir(path):
            raise ValueError(f"--{name.replace('_', '-')} {path} is a directory; "
                             "give the file itself")
    vocab_size = build_tokenizer(args.tokenizer_type, **_tokenizer_kwargs(args)).vocab_size
    output_directory(args.output_prefix, "--output-prefix")
    finals = {key: f"{args.output_prefix}_{key}_document" for key in args.json_keys}
    temps = {key: f"{final}.tmp-{os.getpid()}" for key, final in finals.items()}
    try:
        docs, tokens = _write(args, temps, vocab_size)
        for key in finals:
            # a crash between these renames leaves a pair whose sizes disagree, which
            # check_indexed_dataset reports; never a half-written file
            for ext in (".bin", ".idx"):
                os.replace(temps[key] + ext, finals[key] + ext)
    finally:
        for temp in temps.values():
            for ext in (".bin", ".idx"):
                if os.path.exists(temp + ext):
                    os.remove(temp + ext)
    for key, final in finals.items():
        print(f"wrote {final}.bin/.idx: {docs} documents, {tokens[key]} tokens")
    return {"prefixes": finals, "documents": docs, "tokens": tokens}


if __name__ == "__main__":
    run(main)
